"""Sandboxes owned by one host process, reachable from rollout workers by sandbox id.

A rollout worker can die (preemption, SIGKILL) in the middle of a call. The sandboxes
therefore belong to a longer-lived host process (`SandboxHost`), and workers reach them
through `HostClient`, one Unix-socket connection per request. A call whose worker died
still runs to its end inside the host, so its in-sandbox journal entry is completed,
and the resumed worker finds the result there.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Mapping

from dsv4.sandbox.backends.base import Backend, SandboxHandle
from dsv4.sandbox.errors import NotSupported, SandboxError, SandboxNotFound
from dsv4.sandbox.trajlog.environment import ReplayEnvironment
from dsv4.sandbox.trajlog.hashing import ToolResult
from dsv4.sandbox.types import ExecRequest, SandboxSpec, SnapshotRef

logger = logging.getLogger(__name__)

# Journal directory of the replay wrapper inside every sandbox. It must be writable by
# the sandbox's own user, because the wrapper runs as that user.
REPLAY_JOURNAL_DIR = "/run/dsv4-journal"
# Deadline used when a request has none, seconds.
DEFAULT_TIMEOUT_S = 600.0


class SandboxHost:
    """Creates, runs and kills the sandboxes of one backend; safe to call from many threads."""

    def __init__(self, backend: Backend, spec: SandboxSpec, *, name: str | None = None) -> None:
        self.backend = backend
        self.spec = spec
        self.name = name or f"host-{uuid.uuid4().hex[:8]}"
        self._sandboxes: dict[str, SandboxHandle] = {}
        self._lock = threading.Lock()

    def _new_id(self) -> str:
        return f"{self.name}-{uuid.uuid4().hex[:12]}"

    def _get(self, sandbox_id: str) -> SandboxHandle:
        with self._lock:
            handle = self._sandboxes.get(sandbox_id)
        if handle is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} is not owned by host {self.name}; "
                                  f"it owns {len(self._sandboxes)} sandboxes")
        return handle

    def create(self) -> str:
        sandbox_id = self._new_id()
        handle = self.backend.create(sandbox_id, self.spec)
        with self._lock:
            self._sandboxes[sandbox_id] = handle
        return sandbox_id

    def alive(self, sandbox_id: str) -> bool:
        with self._lock:
            handle = self._sandboxes.get(sandbox_id)
        return handle is not None and handle.is_alive()

    def exec(self, sandbox_id: str, argv: list[str], stdin: bytes, cwd: str | None,
             env: Mapping[str, str], timeout_s: float | None) -> ToolResult:
        result = self._get(sandbox_id).exec(ExecRequest(argv, stdin=stdin or None, cwd=cwd, env=dict(env),
                                                        timeout_s=timeout_s or DEFAULT_TIMEOUT_S))
        return ToolResult(result.exit_code, result.stdout, result.stderr, result.timed_out)

    def snapshot(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            ref = self._get(sandbox_id).snapshot("fs")
        except NotSupported:
            return None
        return {"layer": ref.layer, "kind": ref.kind, "path": ref.path, "source_id": ref.source_id,
                "meta": dict(ref.meta)}

    def restore(self, snapshot: dict[str, Any]) -> str | None:
        ref = SnapshotRef(snapshot["layer"], snapshot["kind"], snapshot["path"], self.spec,
                          snapshot["source_id"], snapshot.get("meta", {}))
        sandbox_id = self._new_id()
        try:
            handle = self.backend.restore(sandbox_id, ref)
        except (NotSupported, SandboxError, OSError) as error:
            logger.warning("host %s: restore of %s failed: %s", self.name, snapshot.get("path"), error)
            return None
        with self._lock:
            self._sandboxes[sandbox_id] = handle
        return sandbox_id

    def kill(self, sandbox_id: str) -> None:
        with self._lock:
            handle = self._sandboxes.pop(sandbox_id, None)
        if handle is not None:
            handle.kill()

    def sandbox_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._sandboxes)

    def close(self) -> None:
        for sandbox_id in self.sandbox_ids():
            self.kill(sandbox_id)


class HostProvider:
    """EnvironmentProvider over anything with SandboxHost's methods (local, socket client, Ray)."""

    def __init__(self, host: Any, journal_dir: str = REPLAY_JOURNAL_DIR) -> None:
        self.host = host
        self.journal_dir = journal_dir

    def _env(self, sandbox_id: str) -> ReplayEnvironment:
        host = self.host

        def executor(argv: list[str], *, stdin: bytes, cwd: str | None, env: Mapping[str, str],
                     timeout_s: float | None) -> ToolResult:
            return host.exec(sandbox_id, argv, stdin, cwd, dict(env), timeout_s)

        return ReplayEnvironment(sandbox_id, executor, self.journal_dir, snapshot=lambda: host.snapshot(sandbox_id))

    def create(self) -> ReplayEnvironment:
        return self._env(self.host.create())

    def reattach(self, sandbox_id: str) -> ReplayEnvironment | None:
        return self._env(sandbox_id) if self.host.alive(sandbox_id) else None

    def restore(self, snapshot: dict[str, Any]) -> ReplayEnvironment | None:
        sandbox_id = self.host.restore(snapshot)
        return self._env(sandbox_id) if sandbox_id is not None else None


_METHODS = frozenset({"create", "alive", "exec", "snapshot", "restore", "kill", "sandbox_ids"})


class HostServer:
    """Serves a SandboxHost on a Unix socket; one thread per connection, one request each."""

    def __init__(self, host: SandboxHost, socket_path: str | os.PathLike[str], authkey: bytes) -> None:
        self.host = host
        self.socket_path = str(socket_path)
        self._listener = Listener(self.socket_path, family="AF_UNIX", authkey=authkey)
        self._thread = threading.Thread(target=self._accept, name=f"host-server-{host.name}", daemon=True)
        self._closed = False
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: Connection) -> None:
        with connection:
            try:
                method, args = connection.recv()
            except (EOFError, OSError):
                return
            if method not in _METHODS:
                reply: tuple[bool, Any] = (False, ValueError(f"unknown host method {method!r}"))
            else:
                try:
                    reply = (True, getattr(self.host, method)(*args))
                except Exception as error:  # sent back to the client, which re-raises it
                    reply = (False, error)
            try:
                connection.send(reply)
            except OSError:
                # The worker died while its call ran; the journal inside the sandbox has the result.
                logger.info("host %s: client of %s went away before the reply", self.host.name, method)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        Path(self.socket_path).unlink(missing_ok=True)


class HostClient:
    """Calls a HostServer; has the same methods as SandboxHost."""

    def __init__(self, socket_path: str | os.PathLike[str], authkey: bytes) -> None:
        self.socket_path = str(socket_path)
        self._authkey = authkey

    def _call(self, method: str, *args: Any) -> Any:
        with Client(self.socket_path, family="AF_UNIX", authkey=self._authkey) as connection:
            connection.send((method, args))
            ok, value = connection.recv()
        if not ok:
            raise value
        return value

    def __getattr__(self, method: str) -> Any:
        if method not in _METHODS:
            raise AttributeError(method)
        return lambda *args: self._call(method, *args)


__all__ = ["HostClient", "HostProvider", "HostServer", "REPLAY_JOURNAL_DIR", "SandboxHost"]

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
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Mapping

from dsv4.sandbox.errors import NotSupported, SandboxError, SandboxNotFound
from dsv4.sandbox.host import Host
from dsv4.sandbox.trajlog.environment import ReplayEnvironment
from dsv4.sandbox.trajlog.hashing import ToolResult
from dsv4.sandbox.types import ExecRequest, SandboxSpec, SnapshotRef

logger = logging.getLogger(__name__)

# Journal directory of the replay wrapper inside every sandbox. The wrapper runs as the
# sandbox's user, and /tmp is writable and lives as long as the sandbox in the function,
# container and microVM layers (checked with dsv4's own layers). The leading dot keeps
# it out of `rm -rf /tmp/*`.
REPLAY_JOURNAL_DIR = "/tmp/.dsv4-journal"
# Deadline used when a request has none, seconds.
DEFAULT_TIMEOUT_S = 600.0


class SandboxHost:
    """Runs calls on the sandboxes of a `dsv4.sandbox.Host` by sandbox id (thread-safe).

    Every sandbox it creates uses `spec`. Admission, naming and reaping are the Host's.
    """

    def __init__(self, host: Host, spec: SandboxSpec) -> None:
        self.host = host
        self.spec = spec

    def create(self) -> str:
        return self.host.create(self.spec).sandbox_id

    def alive(self, sandbox_id: str) -> bool:
        try:
            return self.host.get(sandbox_id).is_alive()
        except SandboxNotFound:
            return False

    def exec(self, sandbox_id: str, argv: list[str], stdin: bytes, cwd: str | None,
             env: Mapping[str, str], timeout_s: float | None) -> ToolResult:
        request = ExecRequest(argv, stdin=stdin or None, cwd=cwd, env=dict(env),
                              timeout_s=timeout_s or DEFAULT_TIMEOUT_S)
        result = self.host.get(sandbox_id).exec(request)
        return ToolResult(result.exit_code, result.stdout, result.stderr, result.timed_out)

    def snapshot(self, sandbox_id: str) -> dict[str, Any] | None:
        """Take a file-system snapshot; None when the layer has none."""
        try:
            ref = self.host.get(sandbox_id).snapshot("fs")
        except NotSupported:
            return None
        return {"layer": ref.layer, "kind": ref.kind, "path": ref.path, "source_id": ref.source_id,
                "meta": dict(ref.meta)}

    def restore(self, snapshot: dict[str, Any]) -> str | None:
        ref = SnapshotRef(snapshot["layer"], snapshot["kind"], snapshot["path"], self.spec,
                          snapshot["source_id"], snapshot.get("meta", {}))
        try:
            return self.host.restore(ref).sandbox_id
        except (NotSupported, SandboxError, OSError) as error:
            logger.warning("restore of snapshot %s failed: %s", snapshot.get("path"), error)
            return None

    def kill(self, sandbox_id: str) -> None:
        self.host.kill(sandbox_id)

    def sandbox_ids(self) -> list[str]:
        return sorted(handle.sandbox_id for handle in self.host.list())

    def close(self) -> None:
        self.host.close()


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
        self._thread = threading.Thread(target=self._accept, name="sandbox-host-server", daemon=True)
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
                logger.info("host server %s: client of %s went away before the reply", self.socket_path, method)

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

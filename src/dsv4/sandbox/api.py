"""The public sandbox API: one ``Sandbox`` class over every layer, and its async twin.

Example::

    from dsv4.sandbox import Sandbox

    with Sandbox.create(layer="container", memory_mb=256) as sandbox:
        result = sandbox.exec("echo hello; ls /work", timeout_s=5)
        sandbox.files.write("/work/data.txt", "42\\n")
        shell = sandbox.session("bash")
        shell.run("cd /work && export N=1")
        print(shell.run("echo $N $(pwd)").stdout)

The layer (``function``, ``container``, ``microvm``, ``vm``) is the only switch; check
``Sandbox.capabilities(layer)`` for what a layer supports.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Literal, Mapping, Sequence

from dsv4.sandbox.backends.base import SandboxHandle, SessionHandle, SessionKind
from dsv4.sandbox.errors import ExecTimeout, InvalidSpec, NotSupported
from dsv4.sandbox.host import Host, load_backend_class
from dsv4.sandbox.types import (Capabilities, ExecRequest, ExecResult, FileInfo, SandboxSpec,
                                SandboxStats, SnapshotRef)

DEFAULT_MAX_OUTPUT = 1 << 20


def _argv(command: str | Sequence[str]) -> list[str]:
    if isinstance(command, str):
        return ["sh", "-c", command]
    return list(command)


class Files:
    """File plane of one sandbox: paths are absolute paths inside the sandbox."""

    def __init__(self, handle: SandboxHandle) -> None:
        self._handle = handle

    def read(self, path: str) -> bytes:
        return self._handle.read_file(path)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self._handle.read_file(path).decode(encoding)

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Create or replace ``path``; str data is encoded as UTF-8. Parents are created."""
        self._handle.write_file(path, data.encode() if isinstance(data, str) else data, mode)

    def list(self, path: str) -> list[FileInfo]:
        return self._handle.list_dir(path)

    def exists(self, path: str) -> bool:
        parent, name = os.path.split(path.rstrip("/") or "/")
        try:
            return any(entry.name == name for entry in self._handle.list_dir(parent or "/"))
        except FileNotFoundError:
            return False

    def remove(self, path: str) -> None:
        self._handle.remove(path)

    def upload(self, local_path: str, path: str) -> None:
        """Copy a host file or directory tree into the sandbox at ``path``."""
        if os.path.isdir(local_path):
            for dirpath, _, filenames in os.walk(local_path):
                relative = os.path.relpath(dirpath, local_path)
                for name in filenames:
                    target = os.path.normpath(os.path.join(path, relative, name))
                    self.upload(os.path.join(dirpath, name), target)
            return
        with open(local_path, "rb") as handle:
            data = handle.read()
        self.write(path, data, os.stat(local_path).st_mode & 0o777)

    def download(self, path: str, local_path: str) -> None:
        """Copy a sandbox file or directory tree to ``local_path`` on the host."""
        entries = None
        try:
            entries = self._handle.list_dir(path)
        except (NotADirectoryError, OSError) as error:
            if isinstance(error, FileNotFoundError):
                raise
        if entries is None:
            os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
            with open(local_path, "wb") as handle:
                handle.write(self._handle.read_file(path))
            return
        os.makedirs(local_path, exist_ok=True)
        for entry in entries:
            if entry.type in ("file", "dir"):
                self.download(entry.path, os.path.join(local_path, entry.name))


class Session:
    """A persistent bash or Python interpreter inside the sandbox."""

    def __init__(self, handle: SessionHandle) -> None:
        self._handle = handle
        self.kind = handle.kind

    def run(self, code: str, *, timeout_s: float = 60.0, max_output: int = DEFAULT_MAX_OUTPUT,
            raise_on_timeout: bool = True) -> ExecResult:
        """Run ``code`` in the session; a timeout kills the session (seconds, hard deadline)."""
        result = self._handle.run(code, timeout_s=timeout_s, max_output=max_output)
        if result.timed_out and raise_on_timeout:
            raise ExecTimeout(result, timeout_s)
        return result

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox:
    """One sandbox of any layer. Create it with ``Sandbox.create``; ``with`` kills it on exit."""

    def __init__(self, host: Host, handle: SandboxHandle) -> None:
        self._host = host
        self._handle = handle
        self.files = Files(handle)

    # Creation --------------------------------------------------------------------------------
    @classmethod
    def create(cls, image: str = "host", *, layer: str = "container", cpu: float = 1.0,
               memory_mb: int = 512, disk_mb: int = 1024, pids: int = 256,
               lifetime_s: float = 600.0, network: Literal["none"] = "none",
               env: Mapping[str, str] | None = None, workdir: str = "/work",
               labels: Mapping[str, str] | None = None, options: Mapping[str, Any] | None = None,
               host: Host | None = None) -> "Sandbox":
        """Create a sandbox and return it once it accepts commands.

        ``cpu`` is in cores, ``memory_mb`` and ``disk_mb`` in MiB, ``pids`` counts processes
        and threads, ``lifetime_s`` is seconds until the host kills the sandbox (extend with
        ``set_timeout``). ``network`` accepts only ``"none"``. ``options`` contains layer-specific
        settings, such as ``{"runtime": "runsc"}`` for the container layer. Raises ``Busy``
        when the host budget is used up and ``StartError`` when the layer fails to start.
        """
        spec = SandboxSpec(layer=layer, image=image, cpu=cpu, memory_mb=memory_mb,
                           disk_mb=disk_mb, pids=pids, lifetime_s=lifetime_s, network=network,
                           env=dict(env or {}), workdir=workdir, labels=dict(labels or {}),
                           options=dict(options or {}))
        host = host or Host.default()
        return cls(host, host.create(spec))

    @classmethod
    def from_snapshot(cls, ref: SnapshotRef, *, host: Host | None = None) -> "Sandbox":
        host = host or Host.default()
        return cls(host, host.restore(ref))

    @classmethod
    def connect(cls, sandbox_id: str, *, host: Host | None = None) -> "Sandbox":
        """Return the live sandbox ``sandbox_id`` of this host (raises ``SandboxNotFound``)."""
        host = host or Host.default()
        return cls(host, host.get(sandbox_id))

    @classmethod
    def list(cls, labels: Mapping[str, str] | None = None, *,
             host: Host | None = None) -> list["Sandbox"]:
        host = host or Host.default()
        return [cls(host, handle) for handle in host.list(dict(labels or {}))]

    @staticmethod
    def capabilities(layer: str, runtime: str | None = None) -> Capabilities:
        return load_backend_class(layer, runtime).capabilities()

    @staticmethod
    def capability_table() -> dict[str, Capabilities]:
        """Return the capabilities of every installed layer and runtime, keyed by name."""
        table = {}
        for name, layer, runtime in (("function", "function", None),
                                     ("container", "container", None),
                                     ("container-runsc", "container", "runsc"),
                                     ("microvm", "microvm", None), ("vm", "vm", None)):
            try:
                table[name] = load_backend_class(layer, runtime).capabilities()
            except ImportError:
                continue
        return table

    # Properties ------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._handle.sandbox_id

    @property
    def layer(self) -> str:
        return self._handle.layer

    @property
    def spec(self) -> SandboxSpec:
        return self._handle.spec

    @property
    def handle(self) -> SandboxHandle:
        """The layer's handle, for layer-specific calls."""
        return self._handle

    # Commands --------------------------------------------------------------------------------
    def exec(self, command: str | Sequence[str], *, stdin: bytes | str | None = None,
             cwd: str | None = None, env: Mapping[str, str] | None = None,
             timeout_s: float = 60.0, max_output: int = DEFAULT_MAX_OUTPUT,
             idem_key: str | None = None, idle_timeout_s: float | None = None,
             raise_on_timeout: bool = True) -> ExecResult:
        """Run a command and return its exit code and output.

        A str runs through ``sh -c``; a list runs directly. ``timeout_s`` (seconds) is a hard
        deadline: at the deadline every process of the command is killed and ``ExecTimeout``
        is raised with the partial output in ``.result`` (or the result is returned with
        ``timed_out=True`` when ``raise_on_timeout=False``). ``max_output`` caps stdout and
        stderr separately, in bytes. ``idle_timeout_s`` (seconds) ends the command the same way
        when it produces no output for that long.
        """
        request = ExecRequest(_argv(command), stdin.encode() if isinstance(stdin, str) else stdin,
                              cwd, dict(env or {}), timeout_s, max_output, idem_key,
                              idle_timeout_s)
        result = self._handle.exec(request)
        if result.timed_out and raise_on_timeout:
            raise ExecTimeout(result, timeout_s)
        return result

    def call(self, function: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
             **kwargs: Any) -> Any:
        """Run a module-level Python function in the sandbox and return its JSON result.

        Only the function layer supports this. Raises ``RemoteError`` when the function
        raises and ``ExecTimeout`` at the deadline.
        """
        call = getattr(self._handle, "call", None)
        if call is None:
            raise NotSupported(self.layer, "call", "use exec with a python3 command instead")
        value, result = call(function, *args, timeout_s=timeout_s, **kwargs)
        if result.timed_out:
            raise ExecTimeout(result, timeout_s)
        return value

    def session(self, kind: SessionKind = "bash") -> Session:
        """Open a persistent bash or Python session; its state lasts until it is closed."""
        if kind not in ("bash", "python"):
            raise InvalidSpec(f"session kind={kind!r} is unknown; use 'bash' or 'python'")
        return Session(self._handle.open_session(kind))

    # State -----------------------------------------------------------------------------------
    def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        return self._handle.snapshot(kind)

    def fork(self, count: int = 1) -> list["Sandbox"]:
        """Return ``count`` new sandboxes restored from a snapshot of this one.

        Uses a full snapshot where the layer supports it, else a filesystem snapshot. The
        snapshot is deleted once the clones exist, because each clone has its own copy.
        """
        backend = self._host.backend(self.layer, self.spec.options.get("runtime"))
        kind: Literal["fs", "full"] = "full" if backend.capabilities().snapshot_full else "fs"
        ref = self.snapshot(kind)
        try:
            return [Sandbox.from_snapshot(ref, host=self._host) for _ in range(count)]
        finally:
            shutil.rmtree(ref.path, ignore_errors=True)

    def pause(self) -> None:
        self._handle.pause()

    def resume(self) -> None:
        self._handle.resume()

    def stats(self) -> SandboxStats:
        return self._handle.stats()

    def is_running(self) -> bool:
        return self._handle.is_alive()

    def set_timeout(self, lifetime_s: float) -> None:
        """Let the sandbox live ``lifetime_s`` more seconds before the host kills it."""
        self._host.set_lifetime(self.id, lifetime_s)

    def kill(self) -> None:
        """Kill every process and remove every host resource of the sandbox. Idempotent."""
        self._host.kill(self.id)
        self._handle.kill()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, layer={self.layer!r})"

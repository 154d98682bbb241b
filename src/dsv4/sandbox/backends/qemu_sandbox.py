"""Sandbox handle shared by the microVM and VM layers: exec, file plane, snapshot, kill.

Commands run in the guest as the unprivileged user ``sbx`` (uid 1000), so ``ulimit -u`` (the
``pids`` limit) applies to them, and the guest's memory size is the memory limit. The file
plane runs small scripts as guest root. The host's deadline and ``kill`` reach every process
of ``sbx``. When the agent stops responding, the host kills QEMU and the sandbox is lost.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dsv4.sandbox.backends.base import SandboxHandle, SessionHandle, SessionKind, result_digest
from dsv4.sandbox.backends.qemu import QemuMachine
from dsv4.sandbox.backends.qemu_agent import AgentResult, AgentUnresponsive, command_script
from dsv4.sandbox.backends.qemu_session import GuestShellSession
from dsv4.sandbox.errors import (InvalidSpec, NotSupported, SandboxError, SandboxFileNotFound,
                                 SandboxLost)
from dsv4.sandbox.types import (JOURNAL_DIR, ExecRequest, ExecResult, FileInfo, SandboxStats,
                                SnapshotRef)

if TYPE_CHECKING:
    from dsv4.sandbox.backends.qemu_backend import QemuBackend

log = logging.getLogger(__name__)

# Exit status the file-plane scripts use for "path does not exist".
MISSING_EXIT = 3
FILE_TIMEOUT_S = 120.0
FILE_CAP = 256 << 20
_FILE_TYPES = {"regular file": "file", "regular empty file": "file", "directory": "dir",
               "symbolic link": "symlink"}


class QemuSandbox(SandboxHandle):
    """One microVM or VM: a QEMU process with the guest agent on its serial port."""

    def __init__(self, sandbox_id, spec, machine: QemuMachine, backend: "QemuBackend") -> None:
        super().__init__(sandbox_id, spec)
        self.layer = backend.layer
        self.machine = machine
        self.backend = backend
        self.created = time.monotonic()
        self._killed = False
        self._paused = False
        self._lock = threading.Lock()

    # Guest calls -------------------------------------------------------------------------------
    def _run(self, script: str, *, user: str, stdin: bytes = b"", cap: int = FILE_CAP,
             timeout_s: float = FILE_TIMEOUT_S) -> AgentResult:
        if self._killed:
            raise SandboxLost(self.sandbox_id, "the sandbox was killed")
        if self._paused:
            raise SandboxError(f"sandbox {self.sandbox_id} is paused; call resume() before exec")
        try:
            return self.machine.agent.run(script, user=user, stdin=stdin, cap=cap,
                                          timeout_s=timeout_s)
        except AgentUnresponsive as exc:
            alive = self.machine.is_alive()
            log.warning("sandbox %s: guest agent unresponsive (QEMU %s): %s; killing the VM",
                        self.sandbox_id, "running" if alive else "exited", exc)
            self.kill()
            raise SandboxLost(self.sandbox_id, f"guest agent unresponsive: {exc}") from exc

    def _root(self, script: str, stdin: bytes = b"") -> AgentResult:
        return self._run(script, user="root", stdin=stdin)

    def exec(self, request: ExecRequest) -> ExecResult:
        if request.idle_timeout_s is not None:
            # NOTE: the agent returns output only when the command ends, so the host cannot
            # see idle periods; only the hard deadline (timeout_s) applies in VM layers.
            raise NotSupported(self.layer, "idle_timeout_s",
                               "output reaches the host only when the command ends; use timeout_s")
        env = dict(self.spec.env)
        env.update(request.env)
        try:
            script = command_script(request.argv, cwd=request.cwd or self.spec.workdir, env=env,
                                    max_processes=self.spec.pids)
        except ValueError as exc:
            raise InvalidSpec(str(exc)) from exc
        raw = self._run(script, user="sbx", stdin=request.stdin or b"", cap=request.max_output,
                        timeout_s=request.timeout_s)
        result = ExecResult(exit_code=raw.exit_code, stdout=raw.stdout, stderr=raw.stderr,
                            timed_out=raw.timed_out, truncated=raw.truncated,
                            duration_s=raw.duration_s, oom_killed=raw.oom_kills > 0)
        if request.idem_key:
            self.write_file(f"{JOURNAL_DIR}/{request.idem_key}", result_digest(result).encode())
        return result

    def journal_lookup(self, idem_key: str) -> str | None:
        try:
            return self.read_file(f"{JOURNAL_DIR}/{idem_key}").decode()
        except SandboxFileNotFound:
            return None

    def open_session(self, kind: SessionKind = "bash") -> SessionHandle:
        if kind != "bash":
            raise NotSupported(self.layer, f"{kind} sessions", "the guest has no Python; "
                               "use a 'bash' session (busybox sh)")
        return GuestShellSession(self)

    # File plane ----------------------------------------------------------------------------------
    @staticmethod
    def _check_path(path: str) -> str:
        if not path.startswith("/"):
            raise InvalidSpec(f"path={path!r} must be an absolute path inside the sandbox")
        return shlex.quote(path)

    def _missing(self, path: str) -> SandboxFileNotFound:
        return SandboxFileNotFound(f"{path} does not exist in sandbox {self.sandbox_id}")

    def _raise_failed(self, operation: str, path: str, result: AgentResult) -> None:
        if result.exit_code == MISSING_EXIT:
            raise self._missing(path)
        if result.exit_code != 0:
            raise SandboxError(f"{operation} {path} in sandbox {self.sandbox_id} failed with exit "
                               f"status {result.exit_code}: "
                               f"{result.stderr.decode('utf-8', 'replace').strip()}")

    def read_file(self, path: str) -> bytes:
        quoted = self._check_path(path)
        result = self._root(f"[ -f {quoted} ] || exit {MISSING_EXIT}\nexec cat -- {quoted}\n")
        self._raise_failed("reading", path, result)
        if result.truncated:
            raise SandboxError(f"{path} in sandbox {self.sandbox_id} is larger than the "
                               f"{FILE_CAP} bytes the file plane reads; split it or use exec")
        return result.stdout

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        quoted = self._check_path(path)
        # Files the host writes belong to the sandbox user, except the journal.
        owner = "" if path.startswith(JOURNAL_DIR + "/") else f"chown sbx:sbx -- {quoted}\n"
        script = (f"mkdir -p -- \"$(dirname -- {quoted})\" || exit 1\n"
                  f"cat > {quoted} || exit 1\n{owner}chmod {mode & 0o7777:o} -- {quoted}\n")
        result = self._root(script, stdin=data)
        self._raise_failed("writing", path, result)

    def list_dir(self, path: str) -> list[FileInfo]:
        quoted = self._check_path(path)
        # One line per entry: type, size, octal mode, name. Names with newlines are not listed.
        script = (f"[ -d {quoted} ] || exit {MISSING_EXIT}\ncd -- {quoted} || exit 1\n"
                  "for name in * .*; do\n"
                  "  case \"$name\" in .|..) continue ;; esac\n"
                  "  [ -e \"$name\" ] || [ -L \"$name\" ] || continue\n"
                  "  stat -c '%F|%s|%a|%n' -- \"$name\"\n"
                  "done\n")
        result = self._root(script)
        self._raise_failed("listing", path, result)
        entries = []
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            kind, size, mode, name = line.split("|", 3)
            entries.append(FileInfo(name=name, path=f"{path.rstrip('/')}/{name}",
                                    type=_FILE_TYPES.get(kind, "other"),  # type: ignore[arg-type]
                                    size=int(size), mode=int(mode, 8)))
        return sorted(entries, key=lambda entry: entry.name)

    def remove(self, path: str) -> None:
        quoted = self._check_path(path)
        result = self._root(f"[ -e {quoted} ] || [ -L {quoted} ] || exit {MISSING_EXIT}\n"
                            f"exec rm -rf -- {quoted}\n")
        self._raise_failed("removing", path, result)

    # Snapshot, pause, stats, kill ---------------------------------------------------------------
    def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        if kind not in ("fs", "full"):
            raise InvalidSpec(f"snapshot kind={kind!r} is unknown; use 'fs' or 'full'")
        if kind == "fs" and not self.machine.config.disk:
            raise NotSupported(self.layer, "snapshot(kind='fs')",
                               "the microVM's files live in guest memory; use kind='full'")
        if self._killed:
            raise SandboxLost(self.sandbox_id, "the sandbox was killed")
        target = Path(self.backend.snapshot_dir) / f"{self.sandbox_id}-{uuid.uuid4().hex[:8]}"
        target.mkdir(parents=True)
        try:
            with self.machine.agent.exclusive():
                if self.machine.config.disk:
                    self._root("sync\n")  # the guest page cache must reach the overlay first
                    self.machine.qmp.execute("stop")
                    shutil.copyfile(self.machine.run_dir / "disk.qcow2", target / "disk.qcow2")
                if kind == "full":
                    self.machine.save_state(target / "state.bin", resume=not self._paused)
                elif not self._paused:
                    self.machine.qmp.execute("cont")
        except (OSError, RuntimeError, ConnectionError) as exc:
            # QMP errors arrive as RuntimeError, socket and file errors as OSError.
            shutil.rmtree(target, ignore_errors=True)
            raise SandboxError(f"{kind} snapshot of sandbox {self.sandbox_id} to {target} failed: "
                               f"{exc}") from exc
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return SnapshotRef(self.layer, kind, str(target), self.spec, self.sandbox_id,
                           {"config": self.machine.config.key()})

    def pause(self) -> None:
        self.machine.qmp.execute("stop")
        self._paused = True

    def resume(self) -> None:
        self.machine.qmp.execute("cont")
        self._paused = False

    def stats(self) -> SandboxStats:
        # pids counts live processes of the sandbox user (uid 1000), not zombies, the agent's
        # or the kernel's. In /proc/PID/status, Name is the first line and State comes before
        # Uid. cat skips processes that exit while it reads; awk would stop at the first one.
        result = self._root("echo $(cat /proc/[0-9]*/status 2>/dev/null | awk "
                            "'/^Name:/ {state = \"\"} /^State:/ {state = $2} "
                            "/^Uid:/ {if ($2 == 1000 && state != \"Z\") count++} "
                            "END {print count + 0}') "
                            "$(du -sk /work /tmp 2>/dev/null | awk '{s += $1} END {print s}')\n")
        pids, disk_kib = (int(value) for value in result.stdout.split()[:2])
        if self.machine.config.disk:
            disk_bytes = (self.machine.run_dir / "disk.qcow2").stat().st_size
        else:
            disk_bytes = disk_kib * 1024
        return SandboxStats(cpu_s=self.machine.cpu_seconds(), memory_bytes=self.machine.rss_bytes(),
                            pids=pids, disk_bytes=disk_bytes, uptime_s=time.monotonic() - self.created)

    def is_alive(self) -> bool:
        return not self._killed and self.machine.is_alive()

    def kill(self) -> None:
        with self._lock:
            if self._killed:
                return
            self._killed = True
        self.machine.destroy()
        self.backend.forget(self.sandbox_id)

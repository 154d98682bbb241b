"""Shared parts of the layers whose root filesystem and cgroup sit on the host.

The function and container layers both keep the sandbox root in a host directory (read and
written through ``RootFiles``) and the processes in a ``SandboxCgroup``, so the file plane,
the exec journal, pause/resume and the stats come from here.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, TypeVar

from dsv4.sandbox.backends.base import SandboxHandle, result_digest
from dsv4.sandbox.cgroups import SandboxCgroup
from dsv4.sandbox.errors import StartError
from dsv4.sandbox.rootfs_files import RootFiles
from dsv4.sandbox.types import JOURNAL_DIR, ExecRequest, ExecResult, FileInfo, SandboxStats

HandleT = TypeVar("HandleT", bound=SandboxHandle)


class HostRootSandbox(SandboxHandle):
    """A sandbox with ``files`` (its root as seen from the host) and ``cgroup`` attributes."""

    files: RootFiles
    cgroup: SandboxCgroup
    created: float

    def read_file(self, path: str) -> bytes:
        return self.files.read(path)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files.write(path, data, mode)

    def list_dir(self, path: str) -> list[FileInfo]:
        return self.files.list(path)

    def remove(self, path: str) -> None:
        self.files.remove(path)

    def journal_lookup(self, idem_key: str) -> str | None:
        try:
            return self.files.read(f"{JOURNAL_DIR}/{idem_key}").decode()
        except FileNotFoundError:
            return None

    def write_journal(self, request: ExecRequest, result: ExecResult) -> None:
        """Record ``idem_key -> result digest`` inside the sandbox when the request has a key."""
        if request.idem_key:
            self.files.write(f"{JOURNAL_DIR}/{request.idem_key}", result_digest(result).encode())

    def pause(self) -> None:
        self.cgroup.freeze(True)

    def resume(self) -> None:
        self.cgroup.freeze(False)

    def host_stats(self, disk_mount: str) -> SandboxStats:
        """Return cgroup usage plus the bytes used on the sandbox's tmpfs at ``disk_mount``."""
        cpu_s, memory, count = self.cgroup.usage()
        disk = 0
        if os.path.ismount(disk_mount):
            info = os.statvfs(disk_mount)
            disk = (info.f_blocks - info.f_bfree) * info.f_frsize
        return SandboxStats(cpu_s, memory, count, disk, time.monotonic() - self.created)


def start_or_clean_up(sandbox: HandleT, start: Callable[[], None], message: str) -> HandleT:
    """Run ``start``; on any failure kill the half-made sandbox and raise ``StartError``."""
    try:
        start()
    except BaseException as error:
        sandbox.kill()
        if isinstance(error, StartError):
            raise
        if isinstance(error, (OSError, subprocess.SubprocessError)):
            raise StartError(message, layer=sandbox.layer, detail=str(error)) from error
        raise
    return sandbox

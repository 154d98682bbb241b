"""The seccomp deny-list shared by the function and container layers.

Default action is allow. The listed system calls fail with EPERM. They are the kernel-module,
kexec, BPF, perf, keyring, mount and namespace calls, which expose a large kernel attack
surface and which ordinary tools do not use. ``socket`` also fails for every address family
except ``AF_UNIX``, so even a sandbox that shared the host network namespace could not open an
IP socket. Built with ``pyseccomp``
(ctypes over libseccomp).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from dsv4.sandbox.errors import StartError

DENIED_SYSCALLS = (
    "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "keyctl", "add_key", "request_key", "userfaultfd", "mount", "umount2",
    "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount", "unshare", "setns", "swapon",
    "swapoff", "reboot", "settimeofday", "clock_settime", "acct", "quotactl", "syslog",
    "open_by_handle_at", "name_to_handle_at", "ptrace", "process_vm_writev",
)


def _import_pyseccomp() -> Any:
    try:
        import pyseccomp
    except ImportError as error:
        raise StartError("seccomp is unavailable", layer="host",
                         detail="install pyseccomp (pip install pyseccomp==0.1.2) and the "
                                "libseccomp2 system package") from error
    return pyseccomp


def build_filter() -> Any:
    """Return a ``pyseccomp.SyscallFilter`` with the deny-list (not yet loaded)."""
    seccomp = _import_pyseccomp()
    try:
        syscall_filter = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        deny = seccomp.ERRNO(errno.EPERM)
        for name in DENIED_SYSCALLS:
            try:
                syscall_filter.add_rule(deny, name)
            except (ValueError, RuntimeError, OSError):
                continue        # unknown on this architecture or libseccomp version
        syscall_filter.add_rule(deny, "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
        return syscall_filter
    except OSError as error:
        raise StartError("failed to build the seccomp filter", layer="host",
                         detail=f"{error}; check that libseccomp.so.2 is installed") from error


def write_bpf(path: str) -> str:
    """Compile the filter to raw BPF at ``path`` (the format ``bwrap --seccomp FD`` reads)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        build_filter().export_bpf(handle)
    os.replace(tmp, path)
    return path

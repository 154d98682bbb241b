"""Capability probe: which sandbox layers this host can run, and the exact reason when not.

Each check runs the real primitive (a namespace, a cgroup directory, a seccomp filter, a
bubblewrap start) and removes what it made. ``python -m dsv4.sandbox.probe`` prints the table.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid

from dsv4.sandbox import cgroups
from dsv4.sandbox.backends.base import ProbeResult
from dsv4.sandbox.types import LAYERS

PROBE_TIMEOUT_S = 20


def _run(argv: list[str]) -> tuple[bool, str]:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    output = (done.stderr or done.stdout).decode(errors="replace").strip()
    return done.returncode == 0, output.splitlines()[-1] if output else f"exit {done.returncode}"


def check_root() -> str | None:
    if os.geteuid() != 0:
        return (f"not running as root (euid {os.geteuid()}); the function and container "
                f"layers mount filesystems and create cgroups, so run as root")
    return None


def check_cgroups() -> tuple[str | None, str]:
    """Create and remove a probe cgroup with limits; return (problem, description)."""
    try:
        layout = cgroups.detect_layout()
    except Exception as error:  # noqa: BLE001 - any failure is the probe's answer
        return f"cgroups unusable: {error}", ""
    group = cgroups.SandboxCgroup(layout, f"probe-{uuid.uuid4().hex[:8]}")
    try:
        group.create(cpu=0.5, memory_bytes=64 << 20, pids=16)
    except Exception as error:  # noqa: BLE001
        return f"cannot create a cgroup with limits: {error}", layout.mode
    finally:
        group.remove()
    has_kill = bool(layout.v2)
    return None, f"cgroups {layout.mode}" + (" with v2 kill/freeze" if has_kill else "")


def check_seccomp() -> str | None:
    try:
        from dsv4.sandbox.seccomp_filter import build_filter
        build_filter()
    except Exception as error:  # noqa: BLE001
        return f"seccomp unavailable: {error}"
    return None


def check_openat2() -> str | None:
    from dsv4.sandbox.rootfs_files import open_in_root
    root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(open_in_root(root_fd, "/", os.O_RDONLY | os.O_DIRECTORY))
    except OSError as error:
        if error.errno == errno.ENOSYS:
            return "openat2 is missing (needs Linux 5.6+); the file plane cannot confine paths"
        return f"openat2 failed: {error}"
    finally:
        os.close(root_fd)
    return None


def check_namespaces() -> str | None:
    ok, output = _run(["unshare", "--mount", "--net", "--ipc", "--uts", "true"])
    return None if ok else f"cannot create mount/net/ipc/uts namespaces: {output}"


def _filesystem_supported(name: str) -> bool:
    with open("/proc/filesystems") as handle:
        return any(line.split()[-1] == name for line in handle if line.strip())


def probe_function() -> ProbeResult:
    reasons = [r for r in (check_root(), check_namespaces(), check_seccomp(), check_openat2())
               if r]
    problem, description = check_cgroups()
    if problem:
        reasons.append(problem)
    return ProbeResult("function", not reasons, tuple(reasons),
                       (description, f"python {sys.version.split()[0]}"))


def probe_container() -> ProbeResult:
    reasons = [r for r in (check_root(), check_seccomp(), check_openat2()) if r]
    details = []
    problem, description = check_cgroups()
    if problem:
        reasons.append(problem)
    details.append(description)
    if not _filesystem_supported("overlay"):
        reasons.append("the kernel has no overlay filesystem; load the overlay module")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        reasons.append("bubblewrap is not installed; run scripts/install-system-deps "
                       "(apt-get install bubblewrap)")
    else:
        ok, version = _run([bwrap, "--version"])
        details.append(version)
        ok, output = _run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           bwrap, "--unshare-all", "--ro-bind", "/", "/", "true"])
        if not ok:
            reasons.append(f"bubblewrap cannot create namespaces as an unprivileged user: "
                           f"{output}; allow unprivileged user namespaces "
                           f"(sysctl kernel.unprivileged_userns_clone=1, or the AppArmor "
                           f"userns restriction off)")
    runsc = shutil.which("runsc")
    details.append(f"runsc at {runsc}" if runsc else "runsc not installed (no full snapshots)")
    return ProbeResult("container", not reasons, tuple(reasons), tuple(d for d in details if d))


def probe_layer(layer: str) -> ProbeResult:
    """Probe one layer through its backend class (so VM layers report their own checks)."""
    from dsv4.sandbox.host import load_backend_class
    try:
        backend_class = load_backend_class(layer)
    except ImportError as error:
        return ProbeResult(layer, False, (f"the {layer} backend is not installed: {error}",))
    return backend_class.probe()


def probe_all() -> list[ProbeResult]:
    return [probe_layer(layer) for layer in LAYERS]


def format_table(results: list[ProbeResult]) -> str:
    lines = []
    for result in results:
        lines.append(f"{result.layer:<10} {'available' if result.available else 'UNAVAILABLE'}")
        for reason in result.reasons:
            lines.append(f"  - {reason}")
        for detail in result.details:
            lines.append(f"    {detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(probe_all()))

"""Per-sandbox cgroups on cgroup v1, v2 or the hybrid of both.

Layout: every sandbox gets a directory ``dsv4-sbx-<sandbox id>`` under this process's own
cgroup in each hierarchy used (v1 ``memory``, ``pids``, ``cpu``, ``cpuacct``, ``freezer``, and
the v2 tree when mounted). Limits sit on that directory. Processes live in leaf children named
after their role (``zygote``, ``call-3``, ``session-1``), so one leaf can be killed without
touching the rest. On v2, ``cgroup.kill`` and ``cgroup.freeze`` do the work. Without them the
leaf is frozen through the v1 freezer and its processes are sent SIGKILL one by one.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass

from dsv4.sandbox.errors import StartError

logger = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
NAME_PREFIX = "dsv4-sbx-"
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLayout:
    """Locations of this process's cgroups: v1 controller directories and the v2 directory."""

    mode: str                            # "v2", "hybrid" or "v1"
    v1: dict[str, str]                   # controller -> directory of our own cgroup
    v2: str | None                       # our own v2 directory, None when v2 is not mounted

    def parents(self) -> list[str]:
        """Return every directory under which sandbox cgroups are created (deduplicated)."""
        paths = list(dict.fromkeys(self.v1.values()))
        if self.v2:
            paths.append(self.v2)
        return paths


def detect_layout(proc_cgroup: str = "/proc/self/cgroup") -> CgroupLayout:
    """Read the cgroup mounts and this process's membership; raise StartError if unusable."""
    own: dict[str, str] = {}
    with open(proc_cgroup) as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        return CgroupLayout("v2", {}, os.path.join(CGROUP_ROOT, own.get("", "/").lstrip("/")))

    v1: dict[str, str] = {}
    for controller in V1_CONTROLLERS:
        mount = os.path.join(CGROUP_ROOT, controller)
        if os.path.isdir(mount) and controller in own:
            v1[controller] = os.path.join(mount, own[controller].lstrip("/"))
    unified = os.path.join(CGROUP_ROOT, "unified")
    v2 = None
    if os.path.exists(os.path.join(unified, "cgroup.procs")):
        v2 = os.path.join(unified, own.get("", "/").lstrip("/"))
    missing = [c for c in ("memory", "pids", "cpu") if c not in v1]
    if missing:
        raise StartError("cgroup controllers are missing", layer="host",
                         detail=f"v1 controllers {missing} are not mounted under {CGROUP_ROOT}; "
                                f"mount them or boot with cgroup v2")
    return CgroupLayout("hybrid" if v2 else "v1", v1, v2)


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return default


def _read_keyed(path: str) -> dict[str, int]:
    values = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _pids_in(directory: str) -> list[int]:
    """Return the pids in a cgroup directory and all its descendants."""
    pids: list[int] = []
    for dirpath, _, files in os.walk(directory):
        if "cgroup.procs" in files:
            pids.extend(int(p) for p in _read(os.path.join(dirpath, "cgroup.procs")).split())
    return pids


class SandboxCgroup:
    """The cgroup directories of one sandbox in every hierarchy, with limits and leaves."""

    def __init__(self, layout: CgroupLayout, sandbox_id: str) -> None:
        self.layout = layout
        self.sandbox_id = sandbox_id
        self.name = NAME_PREFIX + sandbox_id
        self.v1 = {c: os.path.join(p, self.name) for c, p in layout.v1.items()}
        self.v2 = os.path.join(layout.v2, self.name) if layout.v2 else None

    def directories(self) -> list[str]:
        paths = list(dict.fromkeys(self.v1.values()))
        if self.v2:
            paths.append(self.v2)
        return paths

    def create(self, *, cpu: float, memory_bytes: int, pids: int) -> None:
        """Create the directories and set limits; removes what it made when a write fails."""
        try:
            for path in self.directories():
                os.makedirs(path, exist_ok=True)
            quota = max(1000, int(cpu * CPU_PERIOD_US))
            if self.layout.mode == "v2":
                assert self.v2 is not None and self.layout.v2 is not None
                _enable_v2_controllers(self.layout.v2)
                _write(os.path.join(self.v2, "memory.max"), str(memory_bytes))
                _write(os.path.join(self.v2, "memory.swap.max"), "0")
                _write(os.path.join(self.v2, "pids.max"), str(pids))
                _write(os.path.join(self.v2, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
            else:
                _write(os.path.join(self.v1["memory"], "memory.limit_in_bytes"), str(memory_bytes))
                _write(os.path.join(self.v1["pids"], "pids.max"), str(pids))
                _write(os.path.join(self.v1["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                _write(os.path.join(self.v1["cpu"], "cpu.cfs_quota_us"), str(quota))
        except OSError as error:
            self.remove()
            raise StartError("failed to create the sandbox cgroup", layer="host",
                             detail=f"{error}; on cgroup v2 the parent cgroup must delegate the "
                                    f"memory, pids and cpu controllers (cgroup.subtree_control)"
                             ) from error

    def leaf(self, role: str) -> list[str]:
        """Create leaf ``role``; return the ``cgroup.procs`` files a process writes to join.

        With a v2 tree, the leaf exists only there (for kill and freeze) and the process joins
        the sandbox directory itself in each v1 hierarchy, where limits apply. Without v2, the
        leaf is created in every v1 hierarchy so it can be frozen and listed on its own.
        """
        procs = []
        if self.v2:
            leaf = os.path.join(self.v2, role)
            os.makedirs(leaf, exist_ok=True)
            procs = [os.path.join(path, "cgroup.procs") for path in dict.fromkeys(self.v1.values())]
            return procs + [os.path.join(leaf, "cgroup.procs")]
        for path in self.directories():
            leaf = os.path.join(path, role)
            os.makedirs(leaf, exist_ok=True)
            procs.append(os.path.join(leaf, "cgroup.procs"))
        return procs

    def pids(self, role: str | None = None) -> list[int]:
        """Return the host pids in the sandbox (or in one leaf)."""
        base = self.v2 if self.v2 else self.v1["pids"]
        return sorted(set(_pids_in(os.path.join(base, role) if role else base)))

    def kill(self, role: str | None = None, timeout_s: float = 5.0) -> None:
        """SIGKILL every process of the sandbox (or of one leaf) and wait until none is left."""
        deadline = time.monotonic() + timeout_s
        v2_dir = os.path.join(self.v2, role) if self.v2 and role else self.v2
        used_kill_file = False
        if v2_dir and os.path.exists(os.path.join(v2_dir, "cgroup.kill")):
            try:
                _write(os.path.join(v2_dir, "cgroup.kill"), "1")
                used_kill_file = True
            except OSError as error:
                logger.warning("cgroup.kill failed for %s: %s", v2_dir, error)
        freezer = None if self.v2 else self.v1.get("freezer")
        freezer_dir = os.path.join(freezer, role) if freezer and role else freezer
        while True:
            remaining = self.pids(role)
            if not remaining:
                break
            if time.monotonic() > deadline:
                logger.error("sandbox %s: processes %s survived SIGKILL for %.1f s",
                             self.sandbox_id, remaining, timeout_s)
                break
            if not used_kill_file:
                # Freeze first so a fork bomb cannot outrun the kill loop, then thaw to let
                # the pending SIGKILLs take effect.
                frozen = self._set_v1_freezer(freezer_dir, "FROZEN")
                for pid in remaining:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if frozen:
                    self._set_v1_freezer(freezer_dir, "THAWED")
            time.sleep(0.002)

    @staticmethod
    def _set_v1_freezer(directory: str | None, state: str) -> bool:
        if not directory or not os.path.isdir(directory):
            return False
        try:
            _write(os.path.join(directory, "freezer.state"), state)
            return True
        except OSError:
            return False

    def freeze(self, frozen: bool) -> None:
        """Pause (``frozen=True``) or resume every process of the sandbox."""
        if self.v2 and os.path.exists(os.path.join(self.v2, "cgroup.freeze")):
            _write(os.path.join(self.v2, "cgroup.freeze"), "1" if frozen else "0")
            return
        if not self._set_v1_freezer(self.v1.get("freezer"), "FROZEN" if frozen else "THAWED"):
            raise OSError(errno.ENOTSUP, "no cgroup freezer available (neither v2 nor v1)")

    def memory_events(self) -> dict[str, int]:
        if self.layout.mode == "v2":
            assert self.v2 is not None
            return _read_keyed(os.path.join(self.v2, "memory.events"))
        return _read_keyed(os.path.join(self.v1["memory"], "memory.oom_control"))

    def oom_kills(self) -> int:
        """Return OOM kills in the sandbox so far, including leaves that still exist.

        v2 ``memory.events`` counts the whole subtree. v1 counts a kill only in the victim's
        own cgroup, so the leaves are summed (read it before removing a leaf).
        """
        if self.layout.mode == "v2":
            return self.memory_events().get("oom_kill", 0)
        total = 0
        for dirpath, _, files in os.walk(self.v1["memory"]):
            if "memory.oom_control" in files:
                total += _read_keyed(os.path.join(dirpath, "memory.oom_control")).get(
                    "oom_kill", 0)
        return total

    def pids_events(self) -> int:
        """Return how many forks the pids limit rejected so far."""
        base = self.v2 if self.layout.mode == "v2" else self.v1["pids"]
        assert base is not None
        return _read_keyed(os.path.join(base, "pids.events")).get("max", 0)

    def usage(self) -> tuple[float, int, int]:
        """Return (cpu seconds, memory bytes, pid count)."""
        if self.layout.mode == "v2":
            assert self.v2 is not None
            cpu_s = _read_keyed(os.path.join(self.v2, "cpu.stat")).get("usage_usec", 0) / 1e6
            memory = int(_read(os.path.join(self.v2, "memory.current"), "0") or 0)
            count = int(_read(os.path.join(self.v2, "pids.current"), "0") or 0)
            return cpu_s, memory, count
        cpu_ns = int(_read(os.path.join(self.v1.get("cpuacct", ""), "cpuacct.usage"), "0") or 0)
        memory = int(_read(os.path.join(self.v1["memory"], "memory.usage_in_bytes"), "0") or 0)
        count = int(_read(os.path.join(self.v1["pids"], "pids.current"), "0") or 0)
        return cpu_ns / 1e9, memory, count

    def remove_leaf(self, role: str) -> None:
        """Remove leaf ``role`` in every hierarchy (its processes must be gone)."""
        for path in self.directories():
            remove_tree(os.path.join(path, role))

    def remove(self) -> None:
        """Kill what is left and remove every directory of the sandbox, leaves first."""
        if any(os.path.isdir(path) for path in self.directories()):
            self.kill()
        for path in self.directories():
            remove_tree(path)


def _enable_v2_controllers(parent: str) -> None:
    """Enable memory, pids and cpu for the children of ``parent`` (pure cgroup v2).

    NOTE: only tested on hybrid hosts. The kernel rejects this (EBUSY) while ``parent`` itself
    holds processes, so on a pure-v2 host run dsv4 in a cgroup delegated for it, such as a
    systemd scope with Delegate=yes, and move the host process into a child leaf.
    """
    enabled = set(_read(os.path.join(parent, "cgroup.subtree_control")).split())
    missing = [c for c in ("memory", "pids", "cpu") if c not in enabled]
    if missing:
        _write(os.path.join(parent, "cgroup.subtree_control"),
               " ".join(f"+{c}" for c in missing))


def remove_tree(path: str, timeout_s: float = 2.0) -> None:
    """Remove an empty cgroup directory tree (rmdir, deepest first), retrying while busy."""
    if not os.path.isdir(path):
        return
    deadline = time.monotonic() + timeout_s
    for dirpath, dirnames, _ in sorted(os.walk(path), key=lambda item: -item[0].count("/")):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    logger.error("failed to remove cgroup %s: %s", dirpath, error)
                    break
                time.sleep(0.005)


def list_sandbox_cgroups(layout: CgroupLayout) -> set[str]:
    """Return the sandbox ids that have a cgroup directory in any hierarchy."""
    ids = set()
    for parent in layout.parents():
        try:
            names = os.listdir(parent)
        except FileNotFoundError:
            continue
        ids.update(n[len(NAME_PREFIX):] for n in names if n.startswith(NAME_PREFIX))
    return ids


def join_command(procs_files: list[str], argv: list[str]) -> list[str]:
    """Wrap ``argv`` so the process writes itself into ``procs_files`` before it execs.

    Joining before exec means every child the command later forks starts inside the
    sandbox's cgroups. Exit status 97 means a cgroup write failed.
    """
    script = ('while [ "$1" != "--" ]; do echo $$ > "$1" || exit 97; shift; done; '
              'shift; exec "$@"')
    return ["/bin/sh", "-c", script, "sbx-join", *procs_files, "--", *argv]

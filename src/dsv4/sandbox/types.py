"""Value types shared by the sandbox API and every layer: specs, requests, results, refs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from dsv4.sandbox.errors import InvalidSpec

LAYERS = ("function", "container", "microvm", "vm")

# Path inside every sandbox where the exec journal lives (one file per idem_key). The sandbox
# side writes an entry there before the exec call returns, so it survives as long as the
# sandbox does and a resumed trajectory can ask whether an in-doubt call ran.
JOURNAL_DIR = "/run/sbx/journal"


@dataclass(frozen=True)
class SandboxSpec:
    """Request for a new sandbox: layer, image, resources, lifetime, network and environment."""

    layer: str = "container"
    image: str = "host"
    cpu: float = 1.0                    # CPU cores (cgroup quota), fractional allowed
    memory_mb: int = 512                # memory limit of the whole sandbox, MiB
    disk_mb: int = 1024                 # writable layer size, MiB
    pids: int = 256                     # max processes and threads in the sandbox
    lifetime_s: float = 600.0           # the sandbox is killed this long after creation
    network: Literal["none"] = "none"
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/work"
    labels: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)   # layer-specific, e.g. runtime

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise InvalidSpec(f"layer={self.layer!r} is not a sandbox layer; use one of {LAYERS}")
        if self.network != "none":
            raise InvalidSpec(f"network={self.network!r} is not supported; only 'none' exists")
        for name in ("cpu", "memory_mb", "disk_mb", "pids", "lifetime_s"):
            value = getattr(self, name)
            if not value > 0:
                raise InvalidSpec(f"{name}={value!r} must be > 0")
        if not self.workdir.startswith("/"):
            raise InvalidSpec(f"workdir={self.workdir!r} must be an absolute path")

    def replace(self, **changes: Any) -> "SandboxSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ExecRequest:
    """One command for ``SandboxHandle.exec``.

    ``argv`` is run directly; pass ``["sh", "-c", text]`` for shell syntax. ``timeout_s`` is a
    hard deadline enforced from outside the sandbox. ``max_output`` caps stdout and stderr
    separately (bytes); output past the cap is dropped and ``truncated`` is set.
    ``idem_key``, when set, makes the sandbox side record ``idem_key -> result digest`` under
    ``JOURNAL_DIR`` before the call returns (used by trajectory replay).
    """

    argv: Sequence[str]
    stdin: bytes | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    max_output: int = 1 << 20
    idem_key: str | None = None
    idle_timeout_s: float | None = None    # kill after this long without output, seconds

    def __post_init__(self) -> None:
        if isinstance(self.argv, str) or not self.argv:
            raise InvalidSpec(f"argv={self.argv!r} must be a non-empty list of strings; "
                              f"wrap shell text as ['sh', '-c', text]")
        if not self.timeout_s > 0:
            raise InvalidSpec(f"timeout_s={self.timeout_s!r} must be > 0")
        if self.idle_timeout_s is not None and not self.idle_timeout_s > 0:
            raise InvalidSpec(f"idle_timeout_s={self.idle_timeout_s!r} must be > 0 or None")
        if self.max_output < 0:
            raise InvalidSpec(f"max_output={self.max_output!r} must be >= 0")


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one command. On timeout the output read so far is kept."""

    exit_code: int | None          # None when the command was killed by the deadline
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    truncated: bool = False        # output beyond max_output was dropped
    duration_s: float = 0.0
    oom_killed: bool = False       # the sandbox's memory limit killed a process during the call
    replayed: bool = False         # served from a trajectory log, nothing executed
    step_key: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class SnapshotRef:
    """A saved sandbox state: ``fs`` keeps files only, ``full`` also keeps processes and memory."""

    layer: str
    kind: Literal["fs", "full"]
    path: str                      # host path of the snapshot directory or file
    spec: SandboxSpec
    source_id: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int


@dataclass(frozen=True)
class SandboxStats:
    cpu_s: float                   # CPU time used by all processes of the sandbox, seconds
    memory_bytes: int              # current memory charge of the sandbox
    pids: int                      # live processes and threads
    disk_bytes: int                # bytes in the writable layer
    uptime_s: float


@dataclass(frozen=True)
class Capabilities:
    """Feature table of one layer, so code can check support instead of catching errors."""

    layer: str
    exec: bool = True
    sessions: bool = True
    files: bool = True
    snapshot_fs: bool = False
    snapshot_full: bool = False
    fork: bool = False
    pause: bool = False
    limits: tuple[str, ...] = ()    # enforced limits among cpu, memory, pids, disk, output
    isolation: str = ""             # one-line description of the isolation mechanism
    notes: str = ""

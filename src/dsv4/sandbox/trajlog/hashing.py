"""Canonical request hashing for the trajectory log.

A resumed rollout finds its recorded results by hashing the regenerated request. So
the hash must cover every field that changes what a tool call does. It must leave out
every field that changes from one attempt to the next (sandbox id, host, wall-clock
time, request ids).
Including a volatile field makes every lookup after a resume miss.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Fields a caller may put in a request that never enter the hash.
VOLATILE_FIELDS = frozenset({"sandbox_id", "host", "request_id", "wall_time", "timestamp", "attempt"})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_canonical(value: Any, path: str) -> None:
    """Reject values whose JSON text is not unique (non-finite floats, non-string keys)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"request field {path} is {value!r}; only finite numbers have a canonical encoding")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"request field {path} has key {key!r} of type {type(key).__name__}; keys must be str")
            _check_canonical(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_canonical(item, f"{path}[{index}]")


def canonical_json(value: Any) -> bytes:
    """Encode `value` as JSON with sorted keys, no spaces and UTF-8 text.

    Floats use Python's shortest round-trip repr, so 0.1 always encodes as "0.1".
    """
    _check_canonical(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True)
class ToolRequest:
    """One tool call as the agent issued it.

    `argv` runs without a shell; `command` is a shell string run with `sh -c`. Exactly
    one of them is set. `files` maps a path inside the sandbox to the sha256 of the
    bytes uploaded there before the call. `extra` contains tool-specific fields; keys in
    VOLATILE_FIELDS are dropped from the hash.
    """

    tool: str = "exec"
    argv: tuple[str, ...] | None = None
    command: str | None = None
    stdin: bytes = b""
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    timeout_s: float | None = None
    files: tuple[tuple[str, str], ...] = ()
    backend: str = ""
    image_digest: str = ""
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.command is None):
            raise ValueError("ToolRequest needs exactly one of argv= or command=; got "
                             f"argv={self.argv!r}, command={self.command!r}")
        if self.argv is not None and not isinstance(self.argv, tuple):
            object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "env", tuple(sorted(dict(self.env).items())))
        object.__setattr__(self, "files", tuple(sorted(dict(self.files).items())))
        object.__setattr__(self, "extra", tuple(sorted(dict(self.extra).items())))

    def shell_argv(self) -> list[str]:
        """Return the argv that runs this request (`sh -c` for a command string)."""
        if self.argv is not None:
            return list(self.argv)
        return ["sh", "-c", self.command or ""]

    def hash_fields(self) -> dict[str, Any]:
        """Return the stable fields that identify what this call does."""
        return {
            "tool": self.tool,
            "argv": list(self.argv) if self.argv is not None else None,
            "command": self.command,
            "stdin_sha256": sha256_hex(self.stdin),
            "env": [list(pair) for pair in self.env],
            "cwd": self.cwd,
            "timeout_s": self.timeout_s,
            "files": [list(pair) for pair in self.files],
            "backend": self.backend,
            "image_digest": self.image_digest,
            "extra": {k: v for k, v in self.extra if k not in VOLATILE_FIELDS},
        }

    def to_record(self) -> dict[str, Any]:
        """Return a JSON-safe form for INTENT records; stdin is stored as hex."""
        fields = self.hash_fields()
        fields["stdin_hex"] = self.stdin.hex()
        fields["extra"] = dict(self.extra)
        return fields

    @classmethod
    def from_record(cls, fields: dict[str, Any]) -> ToolRequest:
        return cls(
            tool=fields["tool"],
            argv=tuple(fields["argv"]) if fields["argv"] is not None else None,
            command=fields["command"],
            stdin=bytes.fromhex(fields["stdin_hex"]),
            env=tuple((k, v) for k, v in fields["env"]),
            cwd=fields["cwd"],
            timeout_s=fields["timeout_s"],
            files=tuple((k, v) for k, v in fields["files"]),
            backend=fields["backend"],
            image_digest=fields["image_digest"],
            extra=tuple(fields["extra"].items()),
        )


def request_hash(request: ToolRequest) -> str:
    return sha256_hex(canonical_json(request.hash_fields()))


def idem_key(run_id: str, traj_id: str, step: int, call: int, req_hash: str) -> str:
    """Return the key that names one execution of one call, inside and outside the sandbox."""
    return sha256_hex(canonical_json([run_id, traj_id, step, call, req_hash]))


@dataclass(frozen=True)
class ToolResult:
    """Outcome of a tool call; `replayed` is True when it came from the log."""

    exit_code: int | None  # None when the deadline killed the command
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    replayed: bool = False

    def same_outcome(self, other: ToolResult) -> bool:
        return result_hash(self) == result_hash(other)


def result_hash(result: ToolResult) -> str:
    return sha256_hex(canonical_json({
        "exit_code": result.exit_code,
        "stdout_sha256": sha256_hex(result.stdout),
        "stderr_sha256": sha256_hex(result.stderr),
        "timed_out": result.timed_out,
    }))

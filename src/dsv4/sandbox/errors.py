"""Typed errors of the sandbox runtime.

Every error derives from ``SandboxError``, so callers can catch the whole family. Each error
carries the values a caller needs to react: the partial result of a timed-out command, the
delay before retrying an admission, or the step key of a divergent replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv4.sandbox.types import ExecResult


class SandboxError(Exception):
    """Base class of all sandbox runtime errors."""


class InvalidSpec(SandboxError, ValueError):
    """A sandbox spec or call argument is invalid (names the field, the value and the fix)."""


class StartError(SandboxError):
    """A sandbox failed to start; nothing of it is left on the host."""

    def __init__(self, message: str, *, layer: str, detail: str = "") -> None:
        super().__init__(message if not detail else f"{message}: {detail}")
        self.layer = layer
        self.detail = detail


class ExecTimeout(SandboxError):
    """A command ran past its deadline and was killed; ``result`` keeps the partial output."""

    def __init__(self, result: ExecResult, timeout_s: float) -> None:
        super().__init__(
            f"command timed out after {timeout_s:g} s and was killed with all its processes; "
            f"{len(result.stdout)} bytes of stdout and {len(result.stderr)} bytes of stderr "
            f"were kept in .result; pass a larger timeout_s if the command needs more time")
        self.result = result
        self.timeout_s = timeout_s


class SandboxLost(SandboxError):
    """The sandbox died or was killed, so the call cannot complete."""

    def __init__(self, sandbox_id: str, reason: str) -> None:
        super().__init__(f"sandbox {sandbox_id} is lost: {reason}")
        self.sandbox_id = sandbox_id
        self.reason = reason


class SandboxNotFound(SandboxError, LookupError):
    """No live sandbox has the requested id."""


class SandboxFileNotFound(SandboxError, FileNotFoundError):
    """A path of the file plane does not exist inside the sandbox."""


class Busy(SandboxError):
    """Admission was rejected because the host budget is used up; retry after a delay."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class ResourceExhausted(SandboxError):
    """A sandbox hit one of its limits (memory, pids, disk, output) and the call failed."""

    def __init__(self, message: str, *, resource: str, limit: Any = None) -> None:
        super().__init__(message)
        self.resource = resource
        self.limit = limit


class NotSupported(SandboxError):
    """The layer does not implement the requested operation (see ``capabilities(layer)``)."""

    def __init__(self, layer: str, operation: str, reason: str = "") -> None:
        text = f"layer {layer!r} does not support {operation}"
        super().__init__(f"{text}: {reason}" if reason else text)
        self.layer = layer
        self.operation = operation


class ReplayDivergence(SandboxError):
    """A replayed request does not match the request recorded at the same step key."""

    def __init__(self, step_key: str, recorded_hash: str, request_hash: str,
                 message: str = "") -> None:
        super().__init__(message or (
            f"replay diverged at step {step_key}: recorded request hash {recorded_hash[:16]}…, "
            f"new request hash {request_hash[:16]}…; choose the 'truncate' or 'fork' "
            f"divergence policy to continue live"))
        self.step_key = step_key
        self.recorded_hash = recorded_hash
        self.request_hash = request_hash


class InDoubt(SandboxError):
    """A non-idempotent call may or may not have run, and running it again is not safe."""

    def __init__(self, step_key: str, idem_key: str, reason: str) -> None:
        super().__init__(f"call {step_key} (idem_key {idem_key[:16]}…) is in doubt: {reason}")
        self.step_key = step_key
        self.idem_key = idem_key
        self.reason = reason


class RemoteError(SandboxError):
    """A Python callable run inside the sandbox raised; ``remote_traceback`` is its traceback."""

    def __init__(self, message: str, *, remote_traceback: str = "", result: Any = None) -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback
        self.result = result

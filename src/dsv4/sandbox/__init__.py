"""DSec-style sandbox runtime: one API over function, container, microVM and VM layers.

Standalone: imports nothing else of dsv4. Start with ``Sandbox.create(layer=...)``.
"""

from dsv4.sandbox.api import Files, Sandbox, Session
from dsv4.sandbox.api_async import AsyncSandbox
from dsv4.sandbox.errors import (Busy, ExecTimeout, InDoubt, InvalidSpec, NotSupported,
                                 RemoteError, ReplayDivergence, ResourceExhausted, SandboxError,
                                 SandboxFileNotFound, SandboxLost, SandboxNotFound, StartError)
from dsv4.sandbox.host import Host
from dsv4.sandbox.types import (Capabilities, ExecRequest, ExecResult, FileInfo, SandboxSpec,
                                SandboxStats, SnapshotRef)

__all__ = [
    "AsyncSandbox", "Busy", "Capabilities", "ExecRequest", "ExecResult", "ExecTimeout",
    "FileInfo", "Files", "Host", "InDoubt", "InvalidSpec", "NotSupported", "RemoteError",
    "ReplayDivergence", "ResourceExhausted", "Sandbox", "SandboxError", "SandboxFileNotFound",
    "SandboxLost", "SandboxNotFound", "SandboxSpec", "SandboxStats", "Session", "SnapshotRef",
    "StartError",
]

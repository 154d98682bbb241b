"""The contract every sandbox layer implements.

A layer provides two classes:

* a ``Backend`` (one per host and layer) that creates sandboxes, restores snapshots and
  removes orphaned host resources (``reap``);
* a ``SandboxHandle`` per live sandbox with exec, sessions, the file plane, snapshot, pause,
  kill and stats.

Rules every layer keeps:

* Deadlines are enforced by the host side (a timer outside the sandbox that kills the whole
  process tree or cgroup), never by code running inside the sandbox. On timeout ``exec``
  returns an ``ExecResult`` with ``timed_out=True`` and the output read so far; it does not
  raise. ``ExecTimeout`` is raised by the public API, not by layers.
* Every host resource (process, mount, cgroup, directory, socket) carries the sandbox id in its
  name, so ``Backend.reap`` can find and remove what a crashed host process left behind.
* ``kill`` is idempotent and returns only after everything of the sandbox is gone.
* Operations a layer lacks raise ``NotSupported`` (the default implementations below do).
* When ``ExecRequest.idem_key`` is set, the layer writes ``JOURNAL_DIR/<idem_key>`` inside the
  sandbox, containing ``result_digest(result)``, before ``exec`` returns, and
  ``journal_lookup`` reads it back.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Literal

from dsv4.sandbox.errors import NotSupported
from dsv4.sandbox.types import (Capabilities, ExecRequest, ExecResult, FileInfo, SandboxSpec,
                                SandboxStats, SnapshotRef)

SessionKind = Literal["bash", "python"]


def result_digest(result: ExecResult) -> str:
    """Return the sha256 hex digest that identifies a result in the in-sandbox journal."""
    digest = hashlib.sha256()
    for part in (str(result.exit_code).encode(), hashlib.sha256(result.stdout).digest(),
                 hashlib.sha256(result.stderr).digest(), b"1" if result.timed_out else b"0"):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class ProbeResult:
    """Whether a layer can run on this host, and why not when it cannot."""

    layer: str
    available: bool
    reasons: tuple[str, ...] = ()     # one line per missing primitive, with the fix
    details: tuple[str, ...] = ()     # what was found (versions, engines, cgroup mode)


class SessionHandle(abc.ABC):
    """A persistent interpreter (bash or Python) whose state survives between ``run`` calls."""

    kind: SessionKind

    @abc.abstractmethod
    def run(self, code: str, *, timeout_s: float = 60.0, max_output: int = 1 << 20) -> ExecResult:
        """Run ``code`` in the session and return its output.

        On timeout the session is killed (its state is lost) and the result has
        ``timed_out=True``; later calls raise ``SandboxLost``.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """End the session and its processes. Idempotent."""


class SandboxHandle(abc.ABC):
    """One live sandbox of some layer."""

    layer: ClassVar[str]

    def __init__(self, sandbox_id: str, spec: SandboxSpec) -> None:
        self.sandbox_id = sandbox_id
        self.spec = spec

    @abc.abstractmethod
    def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command with a hard deadline; see ``ExecRequest`` and the module rules."""

    def open_session(self, kind: SessionKind = "bash") -> SessionHandle:
        raise NotSupported(self.layer, "sessions")

    # File plane. Paths are absolute paths inside the sandbox.
    @abc.abstractmethod
    def read_file(self, path: str) -> bytes:
        """Return the file's bytes; raise ``SandboxFileNotFound`` when it does not exist."""

    @abc.abstractmethod
    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace the file, creating missing parent directories."""

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[FileInfo]:
        """Return the entries of a directory (not recursive), sorted by name."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove a file or a directory tree; missing paths raise ``SandboxFileNotFound``."""

    def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        raise NotSupported(self.layer, f"snapshot(kind={kind!r})")

    def pause(self) -> None:
        raise NotSupported(self.layer, "pause")

    def resume(self) -> None:
        raise NotSupported(self.layer, "resume")

    def journal_lookup(self, idem_key: str) -> str | None:
        """Return the result digest journaled for ``idem_key`` inside the sandbox, or None."""
        raise NotSupported(self.layer, "journal_lookup")

    @abc.abstractmethod
    def stats(self) -> SandboxStats:
        ...

    @abc.abstractmethod
    def is_alive(self) -> bool:
        ...

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop every process and remove every host resource of the sandbox. Idempotent."""


class Backend(abc.ABC):
    """Factory of sandboxes of one layer on this host.

    ``state_dir`` is the host's state directory. A backend keeps its files under
    ``<state_dir>/<layer>`` with one directory per sandbox id, so ``reap`` can find them after
    a crash. The host calls ``reap`` of each layer that has such a directory.
    """

    layer: ClassVar[str]

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    @classmethod
    @abc.abstractmethod
    def capabilities(cls) -> Capabilities:
        ...

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> ProbeResult:
        """Check the host primitives this layer needs, without leaving anything behind."""

    @abc.abstractmethod
    def create(self, sandbox_id: str, spec: SandboxSpec) -> SandboxHandle:
        """Start a sandbox; on failure raise ``StartError`` after removing what was made."""

    def restore(self, sandbox_id: str, ref: SnapshotRef) -> SandboxHandle:
        """Start a new sandbox from a snapshot taken by this layer."""
        raise NotSupported(self.layer, f"restore of a {ref.kind!r} snapshot")

    @abc.abstractmethod
    def reap(self, live_ids: set[str]) -> list[str]:
        """Remove host resources of sandboxes whose ids are not in ``live_ids``.

        Returns the ids that had leftovers. Called on start-up and periodically by the host.
        """

    def close(self) -> None:
        """Release backend-wide resources (warm pools, templates). Sandboxes stay alive."""

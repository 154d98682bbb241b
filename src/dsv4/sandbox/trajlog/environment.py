"""Sandbox access for trajectory sessions: journaled exec and a way back to a sandbox.

`ReplayEnvironment` runs calls through the in-sandbox journal (see `journal.py`) on top
of any exec function, so it works with every layer whose sandbox has a POSIX shell.
`EnvironmentProvider` is how a resumed session gets a sandbox back: reattach the one
that ran the calls, restore a snapshot, or create a fresh one.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Protocol

from dsv4.sandbox.errors import InDoubt

from .hashing import ToolRequest, ToolResult
from .errors import JournalUnavailable
from .journal import (JournalEntry, JournalState, clear_argv, fetch_argv, is_duplicate, is_unavailable,
                      list_argv, lookup_argv, parse_lookup, wrap_argv)

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs argv inside the sandbox with a host-enforced deadline (timeout_s, seconds)."""

    def __call__(self, argv: list[str], *, stdin: bytes, cwd: str | None,
                 env: Mapping[str, str], timeout_s: float | None) -> ToolResult: ...


# Deadline for the journal's own helper commands (lookup, fetch, list), seconds.
JOURNAL_TIMEOUT_S = 30.0


class ReplayEnvironment:
    """A live sandbox as used by a trajectory session.

    executor: runs argv in the sandbox. journal_dir: absolute path inside the sandbox
    that lives as long as the sandbox. snapshot: returns a JSON-safe reference that the
    provider's `restore` accepts, or None when the layer cannot snapshot.
    """

    def __init__(self, sandbox_id: str, executor: Executor, journal_dir: str, *,
                 snapshot: Callable[[], dict[str, Any]] | None = None, duplicate_wait_s: float = 30.0) -> None:
        if not journal_dir.startswith("/"):
            raise ValueError(f"journal_dir={journal_dir!r} must be an absolute path inside the sandbox")
        self.sandbox_id = sandbox_id
        self.journal_dir = journal_dir
        self._executor = executor
        self._snapshot = snapshot
        self.duplicate_wait_s = duplicate_wait_s

    def _helper(self, argv: list[str]) -> ToolResult:
        result = self._executor(argv, stdin=b"", cwd=None, env={}, timeout_s=JOURNAL_TIMEOUT_S)
        if result.timed_out or result.exit_code != 0:
            raise RuntimeError(f"journal helper {argv[-2:]} failed in sandbox {self.sandbox_id}: "
                               f"exit={result.exit_code} timed_out={result.timed_out} stderr={result.stderr[-500:]!r}")
        return result

    def run(self, request: ToolRequest, key: str, *, idempotent: bool = False) -> ToolResult:
        """Run `request` at most once per `key` in this sandbox.

        A key whose journal entry is finished is not run again: its journaled result comes
        back with replayed=True, so a call whose log record was lost returns what it
        returned the first time. A key that is claimed but unfinished is waited for (the
        earlier run may still be going), then an idempotent call runs again and a
        non-idempotent one raises InDoubt.
        """
        argv = wrap_argv(self.journal_dir, key, request.shell_argv())
        result = self._execute(argv, request)
        if is_unavailable(result, self.journal_dir):
            raise JournalUnavailable(self.sandbox_id, self.journal_dir)
        if is_duplicate(result, key):
            entry = self.lookup(key)
            deadline = time.monotonic() + min(request.timeout_s or self.duplicate_wait_s, self.duplicate_wait_s)
            while entry.state is JournalState.STARTED and time.monotonic() < deadline:
                time.sleep(0.02)
                entry = self.lookup(key)
            if entry.state is JournalState.DONE and entry.result is not None:
                logger.info("sandbox %s: call %s already ran; returning its journaled result", self.sandbox_id, key[:16])
                return entry.result
            if idempotent:
                self.clear(key)
                result = self._execute(argv, request)
            if is_duplicate(result, key):
                raise InDoubt("?", key, f"sandbox {self.sandbox_id} journal shows the call started but "
                              "never finished, so it may have had effects")
        if result.timed_out:
            # The wrapper died with the command, so the partial output is only in the journal files.
            partial = self._helper(fetch_argv(self.journal_dir, key))
            return ToolResult(None, partial.stdout, partial.stderr, timed_out=True)
        return result

    def _execute(self, argv: list[str], request: ToolRequest) -> ToolResult:
        return self._executor(argv, stdin=request.stdin, cwd=request.cwd, env=dict(request.env),
                              timeout_s=request.timeout_s)

    def lookup(self, key: str) -> JournalEntry:
        state, exit_code = parse_lookup(self._helper(lookup_argv(self.journal_dir, key)).stdout)
        if state is not JournalState.DONE:
            return JournalEntry(state)
        output = self._helper(fetch_argv(self.journal_dir, key))
        return JournalEntry(state, ToolResult(exit_code, output.stdout, output.stderr, replayed=True))

    def clear(self, key: str) -> None:
        """Remove a journal entry, so an idempotent call that died midway can run again."""
        self._helper(clear_argv(self.journal_dir, key))

    def journal_keys(self) -> set[str]:
        return set(self._helper(list_argv(self.journal_dir)).stdout.decode().split())

    def snapshot(self) -> dict[str, Any] | None:
        return self._snapshot() if self._snapshot is not None else None


class EnvironmentProvider(Protocol):
    """Gets a sandbox for a trajectory; every method may return None when it cannot."""

    def create(self) -> ReplayEnvironment: ...

    def reattach(self, sandbox_id: str) -> ReplayEnvironment | None: ...

    def restore(self, snapshot: dict[str, Any]) -> ReplayEnvironment | None: ...

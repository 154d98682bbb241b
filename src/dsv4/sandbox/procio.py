"""Host-side I/O of a sandboxed command: feed stdin, collect capped output, enforce a deadline.

The reader runs in the host process, outside the sandbox. When the deadline passes it calls
``on_deadline`` (which kills the command's cgroup) and keeps what was read so far. After the
kill it drains the pipes for a short grace period only, because a process that escaped the kill
could otherwise hold the write ends open forever.
"""

from __future__ import annotations

import os
import selectors
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

DRAIN_GRACE_S = 0.2


@dataclass
class PumpResult:
    stdout: bytes
    stderr: bytes
    truncated: bool
    timed_out: bool
    duration_s: float


def pump(stdout_fd: int, stderr_fd: int, *, stdin_fd: int | None, stdin: bytes | None,
         timeout_s: float, max_output: int, on_deadline: Callable[[], None],
         extra_fds: tuple[int, ...] = (),
         idle_timeout_s: float | None = None) -> tuple[PumpResult, dict[int, bytes]]:
    """Run the I/O loop until every output pipe reaches EOF or the deadline kill is done.

    ``idle_timeout_s`` also ends the command (as a timeout) when neither stdout nor stderr
    produced a byte for that many seconds.

    Closes every fd it is given. ``extra_fds`` are read without a cap (small control data,
    such as a pickled function result) and returned in the dict.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    selector = selectors.DefaultSelector()
    buffers: dict[int, bytearray] = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    extras: dict[int, bytearray] = {fd: bytearray() for fd in extra_fds}
    for fd in (stdout_fd, stderr_fd, *extra_fds):
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)

    pending = memoryview(stdin or b"")
    if stdin_fd is not None:
        if pending:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            os.close(stdin_fd)
            stdin_fd = None

    truncated = False
    timed_out = False
    drain_until: float | None = None
    last_output = start
    try:
        while selector.get_map():
            now = time.monotonic()
            if idle_timeout_s is not None:
                deadline = min(start + timeout_s, last_output + idle_timeout_s)
            if drain_until is None and now >= deadline:
                timed_out = True
                on_deadline()
                drain_until = time.monotonic() + DRAIN_GRACE_S
            if drain_until is not None and time.monotonic() >= drain_until:
                break
            limit = drain_until if drain_until is not None else deadline
            for key, _ in selector.select(max(0.0, limit - time.monotonic())):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        written = os.write(fd, pending[:65536])
                    except BrokenPipeError:
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(fd)
                        os.close(fd)
                        stdin_fd = None
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    continue
                if fd in extras:
                    extras[fd] += chunk
                    continue
                last_output = time.monotonic()
                room = max_output - len(buffers[fd])
                if len(chunk) > room:
                    truncated = True
                    chunk = chunk[:max(room, 0)]
                buffers[fd] += chunk     # past the cap the pipe is still drained, not stored
    finally:
        selector.close()
        for fd in (stdout_fd, stderr_fd, *extra_fds, *([stdin_fd] if stdin_fd is not None else [])):
            try:
                os.close(fd)
            except OSError:
                pass
    result = PumpResult(bytes(buffers[stdout_fd]), bytes(buffers[stderr_fd]), truncated,
                        timed_out, time.monotonic() - start)
    return result, {fd: bytes(data) for fd, data in extras.items()}


T = TypeVar("T")


class StdioPipes:
    """Three pipes for a child's stdin, stdout and stderr."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()

    def start(self, spawn: Callable[[int, int, int], T]) -> T:
        """Call ``spawn(stdin, stdout, stderr)`` with the child ends and return its result.

        The child ends are closed afterwards in this process. When ``spawn`` fails, the
        parent ends are closed too, so nothing leaks.
        """
        try:
            return spawn(self.stdin_r, self.stdout_w, self.stderr_w)
        except BaseException:
            for fd in (self.stdin_w, self.stdout_r, self.stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (self.stdin_r, self.stdout_w, self.stderr_w):
                os.close(fd)

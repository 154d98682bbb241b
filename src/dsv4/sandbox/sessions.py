"""Persistent bash and Python sessions over the stdio pipes of one long-lived process.

Each ``run`` writes the code, then a command that prints a random end marker and the exit
status on stdout and on stderr. The reader collects output until both markers arrive.
The host enforces the deadline: on timeout it calls ``kill`` (the layer kills the session's
cgroup leaf) and the session is dead from then on.
"""

from __future__ import annotations

import os
import re
import secrets
import selectors
import time
from typing import Callable

from dsv4.sandbox.backends.base import SessionHandle, SessionKind
from dsv4.sandbox.errors import SandboxLost
from dsv4.sandbox.types import ExecResult

# The Python driver runs inside the sandbox: it reads a length-prefixed code block from stdin,
# executes it in one persistent namespace, prints errors as tracebacks, then the end markers.
PYTHON_DRIVER = r"""
import sys, traceback
namespace = {"__name__": "__main__"}
stdin = sys.stdin.buffer
while True:
    header = stdin.readline()
    if not header:
        break
    marker, size = header.decode().split()
    code = stdin.read(int(size)).decode()
    status = 0
    try:
        exec(compile(code, "<session>", "exec"), namespace)
    except SystemExit as error:
        status = error.code if isinstance(error.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stdout.write(f"\n{marker} {status}\n")
    sys.stderr.write(f"\n{marker} {status}\n")
    sys.stdout.flush()
    sys.stderr.flush()
"""

SESSION_ARGV: dict[str, list[str]] = {
    "bash": ["bash", "--noprofile", "--norc"],
    "python": ["python3", "-u", "-c", PYTHON_DRIVER],
}


class PipeSession(SessionHandle):
    """A session whose process the layer already started with three pipes."""

    def __init__(self, kind: SessionKind, sandbox_id: str, stdin_fd: int, stdout_fd: int,
                 stderr_fd: int, kill: Callable[[], None]) -> None:
        self.kind = kind
        self.sandbox_id = sandbox_id
        self._stdin = stdin_fd
        self._stdout = stdout_fd
        self._stderr = stderr_fd
        self._kill = kill
        self._closed = False
        os.set_blocking(stdout_fd, False)
        os.set_blocking(stderr_fd, False)

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, code: str, *, timeout_s: float = 60.0, max_output: int = 1 << 20) -> ExecResult:
        if self._closed:
            raise SandboxLost(self.sandbox_id, f"the {self.kind} session was closed or killed")
        marker = "__SBX_END_" + secrets.token_hex(8)
        if self.kind == "python":
            data = code.encode()
            message = f"{marker} {len(data)}\n".encode() + data
        else:
            message = (f"{code}\n__sbx_status=$?; printf '\\n%s %s\\n' {marker} $__sbx_status; "
                       f"printf '\\n%s %s\\n' {marker} $__sbx_status >&2\n").encode()
        start = time.monotonic()
        try:
            _write_all(self._stdin, message)
        except BrokenPipeError:
            self.close()
            raise SandboxLost(self.sandbox_id, f"the {self.kind} session process exited")
        return self._collect(marker, start, timeout_s, max_output)

    def _collect(self, marker: str, start: float, timeout_s: float,
                 max_output: int) -> ExecResult:
        pattern = re.compile(rb"\n?" + marker.encode() + rb" (-?\d+)\n")
        buffers = {self._stdout: bytearray(), self._stderr: bytearray()}
        done: dict[int, int] = {}
        selector = selectors.DefaultSelector()
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        deadline = start + timeout_s
        try:
            while len(done) < 2:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill()
                    self._closed = True
                    return ExecResult(None, bytes(buffers[self._stdout][:max_output]),
                                      bytes(buffers[self._stderr][:max_output]), timed_out=True,
                                      truncated=any(len(b) > max_output for b in buffers.values()),
                                      duration_s=time.monotonic() - start)
                for key, _ in selector.select(remaining):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        self.close()
                        raise SandboxLost(self.sandbox_id,
                                          f"the {self.kind} session process exited")
                    buffer = buffers[key.fd]
                    buffer += chunk
                    found = pattern.search(buffer)
                    if found:
                        done[key.fd] = int(found.group(1))
                        del buffer[found.start():]
                        selector.unregister(key.fd)
        finally:
            selector.close()
        stdout, stderr = bytes(buffers[self._stdout]), bytes(buffers[self._stderr])
        truncated = len(stdout) > max_output or len(stderr) > max_output
        # NOTE: a session buffers output up to its end marker, so max_output caps what is
        # returned but not what is held in host memory during one run.
        return ExecResult(done[self._stdout], stdout[:max_output], stderr[:max_output],
                          truncated=truncated, duration_s=time.monotonic() - start)

    def close(self) -> None:
        if self._closed and self._stdin < 0:
            return
        self._closed = True
        self._kill()
        for fd in (self._stdin, self._stdout, self._stderr):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stdin = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

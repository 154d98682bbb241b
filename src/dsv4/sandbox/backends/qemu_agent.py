"""Host side of the guest agent protocol that runs over a VM's serial port.

The agent (``dsv4/sandbox/guest/agent``) reads requests from ttyS0 in raw mode. QEMU exposes
that port as a Unix socket, and ``AgentChannel`` speaks to it: one request at a time, replies
framed by ``@@dsv4`` header lines with byte counts, so payloads are binary safe. Anything
else on the line (boot messages, BIOS output) is skipped while looking for a header.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

MARKER = b"@@dsv4 "
# How long the agent gets to deliver the partial result after the host sent "kill".
KILL_GRACE_S = 10.0
SEND_TIMEOUT_S = 30.0
DEFAULT_PATH = "/bin:/sbin:/usr/bin:/usr/sbin"


class AgentUnresponsive(Exception):
    """The guest agent did not respond in time, or the serial socket closed."""


@dataclass(frozen=True)
class AgentResult:
    exit_code: int | None       # None when the host's deadline killed the command
    stdout: bytes               # at most ``cap`` bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration_s: float
    oom_kills: int = 0          # processes the guest's OOM killer ended during the request


class AgentChannel:
    """Client of the serial agent of one VM; thread safe, one request in flight."""

    def __init__(self, socket_path: str, connect_timeout_s: float = 10.0) -> None:
        self.socket_path = socket_path
        self._lock = threading.RLock()
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        deadline = time.monotonic() + connect_timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise AgentUnresponsive(
                        f"serial socket {socket_path} did not accept a connection within "
                        f"{connect_timeout_s:g} s: {exc}") from exc
                time.sleep(0.02)
        self._sock = sock

    def close(self) -> None:
        self._sock.close()

    def exclusive(self) -> threading.RLock:
        """Return the request lock; holding it keeps other requests out (e.g. during a snapshot)."""
        return self._lock

    def _send(self, data: bytes) -> None:
        # The socket's timeout is left over from the last read, which may be nearly zero.
        self._sock.settimeout(SEND_TIMEOUT_S)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise AgentUnresponsive(f"writing to serial socket {self.socket_path} failed: {exc}") from exc

    # Low-level reading with absolute deadlines (time.monotonic()).
    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(1 << 16)
        except socket.timeout as exc:
            raise TimeoutError from exc
        except OSError as exc:
            raise AgentUnresponsive(f"serial socket {self.socket_path} failed: {exc}") from exc
        if not chunk:
            raise AgentUnresponsive(f"serial socket {self.socket_path} was closed by QEMU")
        self._buffer += chunk

    def _read_header(self, deadline: float) -> list[str]:
        """Return the fields after the marker of the next header line; skip other lines."""
        while True:
            newline = self._buffer.find(b"\n")
            while newline < 0:
                self._fill(deadline)
                newline = self._buffer.find(b"\n")
            line = bytes(self._buffer[:newline])
            del self._buffer[:newline + 1]
            start = line.find(MARKER)
            if start >= 0:
                return line[start + len(MARKER):].decode("ascii", "replace").split()
            if line.strip():
                log.debug("serial %s: %r", self.socket_path, line[:200])

    def _read_exact(self, count: int, deadline: float) -> bytes:
        while len(self._buffer) < count:
            self._fill(deadline)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _expect(self, kind: str, request_id: str, deadline: float) -> list[str]:
        while True:
            fields = self._read_header(deadline)
            if len(fields) >= 2 and fields[0] == kind and fields[1] == request_id:
                return fields
            log.debug("serial %s: skipped stale header %s", self.socket_path, fields)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the agent runs after a cold boot.

        The agent prints a banner when it starts, but the banner is lost when it comes before
        the host connects, so the host also pings once a second until one of the two arrives.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                request_id = f"p{next(self._ids)}"
                self._send(f"ping {request_id}\n".encode())
                step_deadline = min(deadline, time.monotonic() + 1.0)
                try:
                    while True:
                        fields = self._read_header(step_deadline)
                        if fields[:1] == ["ready"] or fields[:1] == ["pong"]:
                            return
                except TimeoutError as exc:
                    if time.monotonic() >= deadline:
                        raise AgentUnresponsive(
                            f"guest agent did not start within {timeout_s:g} s") from exc

    def ping(self, timeout_s: float) -> None:
        """Check that the agent responds; used after a restore instead of the banner."""
        with self._lock:
            request_id = f"p{next(self._ids)}"
            deadline = time.monotonic() + timeout_s
            self._send(f"ping {request_id}\n".encode())
            try:
                self._expect("pong", request_id, deadline)
            except TimeoutError as exc:
                raise AgentUnresponsive(f"guest agent did not respond to a ping within "
                                        f"{timeout_s:g} s") from exc

    def hello(self, hostname: str, epoch_s: int, entropy: bytes, timeout_s: float = 30.0) -> None:
        """Set the guest's hostname and clock and feed ``entropy`` to its random pool."""
        if not hostname or any(ch.isspace() for ch in hostname):
            raise ValueError(f"hostname={hostname!r} must be non-empty without whitespace")
        with self._lock:
            request_id = f"h{next(self._ids)}"
            deadline = time.monotonic() + timeout_s
            self._send(f"hello {request_id} {hostname} {int(epoch_s)} {len(entropy)}\n".encode())
            try:
                self._expect("more", request_id, deadline)
                self._send(entropy)
                self._expect("hello", request_id, deadline)
            except TimeoutError as exc:
                raise AgentUnresponsive(f"guest agent did not complete hello within "
                                        f"{timeout_s:g} s") from exc

    def run(self, script: str, *, user: str, stdin: bytes = b"", cap: int = 1 << 20,
            timeout_s: float = 60.0) -> AgentResult:
        """Run a shell script in the guest as ``user`` ("root" or "sbx") with a host deadline.

        On the deadline the host sends "kill", which ends every process of the sandbox user,
        and returns the output the agent captured up to then with ``timed_out=True``.
        Raises ``AgentUnresponsive`` when the agent does not respond even after the kill.
        """
        if user not in ("root", "sbx"):
            raise ValueError(f"user={user!r} must be 'root' or 'sbx'")
        payload = script.encode()
        with self._lock:
            request_id = f"x{next(self._ids)}"
            started = time.monotonic()
            deadline = started + timeout_s
            header = f"exec {request_id} {user} {len(payload)} {len(stdin)} {cap}\n"
            try:
                self._send(header.encode())
                # The agent reads each payload only after it asked for it, so its reads never
                # run past the end of one payload into the next request.
                accept_deadline = max(deadline, started + KILL_GRACE_S)
                self._expect("go", request_id, accept_deadline)
                self._send(payload)
                if stdin:
                    self._expect("more", request_id, accept_deadline)
                    self._send(stdin)
            except TimeoutError as exc:
                raise AgentUnresponsive(f"guest agent did not accept request {request_id}") from exc
            timed_out = False
            try:
                fields = self._expect("res", request_id, deadline)
            except TimeoutError:
                timed_out = True
                log.debug("request %s passed its %g s deadline; killing the user's processes",
                          request_id, timeout_s)
                self._send(f"kill {request_id}\n".encode())
                try:
                    fields = self._expect("res", request_id, time.monotonic() + KILL_GRACE_S)
                except TimeoutError as exc:
                    raise AgentUnresponsive(
                        f"guest agent did not return request {request_id} within "
                        f"{KILL_GRACE_S:g} s after the kill") from exc
            exit_code, out_len, err_len = int(fields[2]), int(fields[3]), int(fields[4])
            oom_kills = int(fields[5])
            codings = fields[6:8]
            body = self._read_exact(out_len + err_len, time.monotonic() + KILL_GRACE_S + timeout_s)
            duration = time.monotonic() - started
        stdout = _decode(body[:out_len], codings[0], request_id)
        stderr = _decode(body[out_len:], codings[1], request_id)
        truncated = len(stdout) > cap or len(stderr) > cap
        return AgentResult(exit_code=None if timed_out else exit_code, stdout=stdout[:cap],
                           stderr=stderr[:cap], timed_out=timed_out, truncated=truncated,
                           duration_s=duration, oom_kills=oom_kills)


def _decode(data: bytes, coding: str, request_id: str) -> bytes:
    if coding == "raw":
        return data
    if coding == "gzip":
        return gzip.decompress(data)
    raise AgentUnresponsive(f"guest agent sent unknown coding {coding!r} for request {request_id}")


def command_script(argv: Sequence[str], *, cwd: str, env: Mapping[str, str],
                   max_processes: int | None = None) -> str:
    """Return the guest shell script that runs ``argv`` in ``cwd`` with ``env`` and limits."""
    lines = [f"cd {shlex.quote(cwd)} || exit 126"]
    if max_processes is not None:
        # RLIMIT_NPROC counts every process of the sandbox user in the guest.
        lines.append(f"ulimit -u {int(max_processes)}")
    merged = {"PATH": DEFAULT_PATH, "HOME": "/work"}
    merged.update(env)
    for key, value in merged.items():
        if not key.isidentifier():
            raise ValueError(f"environment variable name {key!r} is not a valid shell name")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"

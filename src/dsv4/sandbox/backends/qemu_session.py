"""Persistent shell sessions in a microVM or VM guest, built on the agent's exec requests.

A session is a busybox ``sh`` (the guest has no bash and no Python) that runs as the sandbox
user and reads commands from a FIFO in ``/run/sbx-sessions/<random id>``. A ``sleep`` process
keeps the FIFO's write end open between calls. Its stdout and stderr go to files. Each ``run``
is one exec request that appends the code and an end marker to the FIFO, waits for the marker
in both files, and returns what the code printed. The deadline is the exec's deadline. At the
deadline the host kills every process of the sandbox user, so the session ends, and the output
written until then is read back from the files as guest root.
"""

from __future__ import annotations

import dataclasses
import secrets
import shlex
from typing import TYPE_CHECKING

from dsv4.sandbox.backends.base import SessionHandle
from dsv4.sandbox.backends.qemu_agent import command_script
from dsv4.sandbox.errors import SandboxLost
from dsv4.sandbox.types import ExecResult

if TYPE_CHECKING:
    from dsv4.sandbox.backends.qemu_sandbox import QemuSandbox

SESSION_ROOT = "/run/sbx-sessions"
# Exit status and stderr line of a run script whose session shell is gone.
SESSION_GONE_EXIT = 125
SESSION_GONE_MARKER = "__dsv4_session_gone"


class GuestShellSession(SessionHandle):
    """One persistent ``sh`` in the guest; see the module docstring for the mechanism."""

    kind = "bash"

    def __init__(self, sandbox: "QemuSandbox") -> None:
        self.sandbox = sandbox
        self.directory = f"{SESSION_ROOT}/{secrets.token_hex(6)}"
        self._closed = False
        quoted = shlex.quote(self.directory)
        setup = (f"mkdir -p {quoted} && mkfifo {quoted}/in && touch {quoted}/out {quoted}/err "
                 f"&& chown -R sbx:sbx {quoted} && chmod 0700 {quoted}\n")
        result = sandbox._root(setup)
        if result.exit_code != 0:
            raise SandboxLost(sandbox.sandbox_id, f"creating session directory {self.directory} "
                                                  f"failed: {result.stderr.decode(errors='replace')}")
        env = dict(sandbox.spec.env)
        start = command_script(
            ["sh", "-c",
             f"cd {quoted}; (exec sleep 2147483647) > in 2>/dev/null & echo $! > keeper.pid; "
             f"(cd {shlex.quote(sandbox.spec.workdir)} && "
             f"exec sh < {quoted}/in > {quoted}/out 2> {quoted}/err) & "
             f"echo $! > shell.pid"],
            cwd="/", env=env, max_processes=sandbox.spec.pids)
        result = sandbox._run(start, user="sbx", timeout_s=60)
        if result.exit_code != 0:
            raise SandboxLost(sandbox.sandbox_id, f"starting a session shell failed: "
                                                  f"{result.stderr.decode(errors='replace')}")

    def run(self, code: str, *, timeout_s: float = 60.0, max_output: int = 1 << 20) -> ExecResult:
        if self._closed:
            raise SandboxLost(self.sandbox.sandbox_id, "the session was closed or timed out")
        marker = "__dsv4_end_" + secrets.token_hex(8)
        directory = shlex.quote(self.directory)
        # The code runs in the session shell; the script below only feeds it and waits.
        payload = (code.rstrip("\n") + f"\n__dsv4_rc=$?; echo; echo {marker} $__dsv4_rc; "
                   f"echo >&2; echo {marker} $__dsv4_rc >&2\n").encode()
        exit_if_gone = f"{{ echo {SESSION_GONE_MARKER} >&2; exit {SESSION_GONE_EXIT}; }}"
        script = f"""cd {directory} || {exit_if_gone}
kill -0 "$(cat shell.pid)" 2>/dev/null || {exit_if_gone}
out_start=$(stat -c %s out)
err_start=$(stat -c %s err)
echo "$out_start $err_start" > offsets
cat > in
until tail -c 200 out | grep -q '^{marker} ' && tail -c 200 err | grep -q '^{marker} '; do
    kill -0 "$(cat shell.pid)" 2>/dev/null || {exit_if_gone}
    usleep 10000
done
rc=$(tail -c 200 out | sed -n 's/^{marker} //p')
trailer=$(( ${{#rc}} + {len(marker) + 3} ))
out_end=$(stat -c %s out)
err_end=$(stat -c %s err)
tail -c +$((out_start + 1)) out | head -c $((out_end - out_start - trailer))
tail -c +$((err_start + 1)) err | head -c $((err_end - err_start - trailer)) >&2
exit "$rc"
"""
        raw = self.sandbox._run(script, user="sbx", stdin=payload, cap=max_output,
                                timeout_s=timeout_s)
        if raw.timed_out:
            self._closed = True          # the deadline killed every process of the user
            raw = self._partial_output(raw, max_output)
        elif raw.exit_code == SESSION_GONE_EXIT and SESSION_GONE_MARKER.encode() in raw.stderr:
            self._closed = True
            raise SandboxLost(self.sandbox.sandbox_id,
                              "the session shell is gone (exited, or killed by a deadline)")
        return ExecResult(exit_code=raw.exit_code, stdout=raw.stdout, stderr=raw.stderr,
                          timed_out=raw.timed_out, truncated=raw.truncated,
                          duration_s=raw.duration_s)

    def _partial_output(self, raw, max_output: int):
        """Return ``raw`` with the output the session shell wrote before the deadline."""
        if not self.sandbox.is_alive():
            return raw
        directory = shlex.quote(self.directory)
        script = (f"cd {directory} && read out_start err_start < offsets || exit 1\n"
                  "tail -c +$((out_start + 1)) out\n"
                  "tail -c +$((err_start + 1)) err >&2\n")
        partial = self.sandbox._run(script, user="root", cap=max_output, timeout_s=30)
        if partial.exit_code != 0:
            return raw
        return dataclasses.replace(raw, stdout=partial.stdout, stderr=partial.stderr,
                                   truncated=partial.truncated)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.sandbox.is_alive():
            return
        directory = shlex.quote(self.directory)
        self.sandbox._root(f"kill -9 $(cat {directory}/shell.pid {directory}/keeper.pid) "
                           f"2>/dev/null; rm -rf {directory}\n")

"""Container layer on gVisor: ``Sandbox.create(layer="container", options={"runtime": "runsc"})``.

The root filesystem is the same overlay as the bubblewrap runtime, but the processes run on
gVisor's user-space kernel (``runsc --platform=ptrace``, which needs no KVM), so a full
snapshot (processes and memory) works through ``runsc checkpoint`` and ``runsc restore``.
``runsc create`` starts inside the sandbox's cgroup, so the Sentry and the gofer carry the
memory, pids and CPU limits. The host enforces exec deadlines: at the deadline, or when the
command exits, it kills the command's process tree and every orphan it left (listed with
``runsc ps``), so no background child keeps the output pipes open.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from typing import Literal

from dsv4.sandbox import naming
from dsv4.sandbox.backends.base import ProbeResult, SessionHandle, SessionKind
from dsv4.sandbox.backends.host_root import start_or_clean_up
from dsv4.sandbox.backends.container import (RUNSC_ROOT, ContainerBackend, ContainerSandbox,
                                             remove_runsc_state)
from dsv4.sandbox.backends.function import teardown
from dsv4.sandbox.errors import InvalidSpec, SandboxLost, StartError
from dsv4.sandbox.procio import StdioPipes, pump
from dsv4.sandbox.sessions import SESSION_ARGV, PipeSession
from dsv4.sandbox.types import (Capabilities, ExecRequest, ExecResult, SandboxSpec, SandboxStats,
                                SnapshotRef)

logger = logging.getLogger(__name__)

RUNSC_TIMEOUT_S = 30.0
EXIT_GRACE_S = 0.2
RUNSC_EXEC_FAILED = 128         # exit status of "runsc exec" when it cannot run the command
# The container's init: it idles and reaps, so the container lives until it is killed.
INIT_ARGV = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"]


class RunscSandbox(ContainerSandbox):
    layer = "container"
    # NOTE: the cgroup pids limit also counts the Sentry's and gofer's host threads (about 50
    # when idle, more under ptrace with many guest threads), so it is raised by this estimate.
    # A guest fork bomb can still exhaust it and stop the Sentry. The sandbox is then lost,
    # and the host is unaffected.
    host_pids_overhead = 256
    # The Sentry's own memory (an estimate). Guest commands run under RLIMIT_AS = memory_mb,
    # so one runaway process fails inside the sandbox before the cgroup kills the Sentry.
    host_memory_overhead_mb = 128

    def __init__(self, sandbox_id: str, spec: SandboxSpec, backend: "RunscBackend") -> None:
        super().__init__(sandbox_id, spec, backend)
        self.bundle = os.path.join(self.directory, "bundle")
        self.runsc = backend.runsc_command()
        # gVisor's gofer serves the root filesystem as host root, so root inside the sandbox
        # must own its files (the bubblewrap runtime maps them to an unprivileged uid instead).
        self.uid = 0
        self.files.owner = (0, 0)
        self._protected: dict[str, int] = {}     # session role -> in-sandbox pid of its shell

    def _runsc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # Output goes through a file because commands such as "checkpoint --leave-running"
        # start sandbox processes that inherit stdio, so a pipe would never reach EOF.
        with tempfile.TemporaryFile() as output:
            done = subprocess.run([*self.runsc, *args], stdin=subprocess.DEVNULL,
                                  stdout=output, stderr=subprocess.STDOUT,
                                  timeout=RUNSC_TIMEOUT_S)
            output.seek(0)
            done.stdout = output.read()
        if check and done.returncode != 0:
            raise OSError(f"runsc {args[0]} failed for {self.sandbox_id}: "
                          f"{done.stdout.decode(errors='replace').strip()[-500:]}")
        return done

    def _write_bundle(self) -> None:
        os.makedirs(self.bundle, exist_ok=True)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.spec.workdir,
               "LANG": "C.UTF-8", **self.spec.env}
        config = {
            "ociVersion": "1.0.0",
            "process": {"args": INIT_ARGV, "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": [f"{key}={value}" for key, value in env.items()]},
            "root": {"path": self.merged, "readonly": False},
            "hostname": naming.short_name(self.sandbox_id),
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/usr", "type": "bind", "source": "/usr",
                 "options": ["rbind", "ro"]},
            ],
            "linux": {"namespaces": [{"type": name} for name in
                                     ("pid", "network", "ipc", "uts", "mount")]},
        }
        with open(os.path.join(self.bundle, "config.json"), "w") as handle:
            json.dump(config, handle)

    def start_runsc(self, image_path: str | None = None) -> None:
        """Create and start the container, or restore it from a checkpoint image."""
        self._write_bundle()
        from dsv4.sandbox import cgroups
        if image_path:
            command = ["restore", "--image-path", image_path, "--bundle", self.bundle,
                       "--detach", self.sandbox_id]
        else:
            command = ["create", "--bundle", self.bundle, self.sandbox_id]
        # runsc keeps inherited stdio open in the sandbox processes, so its output goes to a
        # file: a pipe would never reach EOF.
        log_path = os.path.join(self.directory, "runsc.log")
        with open(log_path, "wb") as log:
            done = subprocess.run(cgroups.join_command(self.cgroup.leaf("runsc"),
                                                       [*self.runsc, *command]),
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  timeout=RUNSC_TIMEOUT_S)
        if done.returncode != 0:
            with open(log_path, "rb") as log:
                output = log.read().decode(errors="replace").strip()[-500:]
            raise OSError(f"runsc {command[0]} failed: {output}")
        if not image_path:
            self._runsc("start", self.sandbox_id)

    # Processes ---------------------------------------------------------------------------------
    def _process_table(self) -> dict[int, int]:
        """Return in-sandbox pid -> parent pid, from ``runsc ps``."""
        done = self._runsc("ps", self.sandbox_id, check=False)
        table: dict[int, int] = {}
        for line in done.stdout.decode(errors="replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[1].isdigit() and fields[2].isdigit():
                table[int(fields[1])] = int(fields[2])
        return table

    def _kill_tree(self, root_pid: int | None, existing: set[int]) -> None:
        """Kill ``root_pid``, its descendants, and orphans of init not in ``existing``.

        ``existing`` is the process table before the command started, so daemons detached by
        earlier commands and the session shells survive.
        """
        table = self._process_table()
        keep = {1} | existing
        for pid in self._protected.values():
            keep |= _descendants(table, pid)
        victims = {pid for pid, parent in table.items() if parent == 1} - keep
        if root_pid is not None:
            victims |= _descendants(table, root_pid)
        for pid in sorted(victims - {1}):
            self._runsc("kill", "--pid", str(pid), self.sandbox_id, "KILL", check=False)

    def _start_process(self, argv: list[str], cwd: str | None, env: dict[str, str],
                       stdin: int, stdout: int, stderr: int) -> tuple[subprocess.Popen, str]:
        if self._killed:
            raise SandboxLost(self.sandbox_id, "killed")
        pid_file = os.path.join(self.directory, f"exec-{uuid.uuid4().hex[:8]}.pid")
        command = [*self.runsc, "exec", "--cwd", cwd or self.spec.workdir,
                   "--internal-pid-file", pid_file]
        for key, value in env.items():
            command += ["--env", f"{key}={value}"]
        limited = ["prlimit", f"--as={self.spec.memory_mb << 20}", "--", *argv]
        process = subprocess.Popen([*command, self.sandbox_id, *limited], stdin=stdin,
                                   stdout=stdout, stderr=stderr)
        return process, pid_file

    @staticmethod
    def _read_pid(pid_file: str) -> int | None:
        try:
            with open(pid_file) as handle:
                return int(handle.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def exec(self, request: ExecRequest) -> ExecResult:
        existing = set(self._process_table())     # taken before the command can fork
        pipes = StdioPipes()
        process, pid_file = pipes.start(lambda *stdio: self._start_process(
            list(request.argv), request.cwd, dict(request.env), *stdio))
        pump_done = threading.Event()

        def stop() -> None:
            self._kill_tree(self._read_pid(pid_file), existing)
            process.kill()

        def sweep_after_exit() -> None:
            # A background child that still keeps the output pipes open after the command exited
            # would keep the exec open until its deadline, so it is killed after a short grace.
            # Children that redirected their output (proper daemons) close the pipes and live.
            process.wait()
            if not pump_done.wait(EXIT_GRACE_S):
                self._kill_tree(self._read_pid(pid_file), existing)

        oom_before = self.cgroup.oom_kills()
        sweeper = threading.Thread(target=sweep_after_exit, daemon=True)
        sweeper.start()
        try:
            io, _ = pump(pipes.stdout_r, pipes.stderr_r, stdin_fd=pipes.stdin_w,
                         stdin=request.stdin, timeout_s=request.timeout_s,
                         max_output=request.max_output,
                         idle_timeout_s=request.idle_timeout_s,
                         on_deadline=stop)
        finally:
            pump_done.set()
        timed_out = io.timed_out
        try:
            # A command that closed its output still gets only the rest of its deadline.
            returncode = process.wait(timeout=max(0.0, request.timeout_s - io.duration_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop()
            returncode = process.wait()
        sweeper.join(RUNSC_TIMEOUT_S)
        try:
            os.unlink(pid_file)
        except FileNotFoundError:
            pass
        if self._killed:
            raise SandboxLost(self.sandbox_id, "killed during exec")
        if returncode == RUNSC_EXEC_FAILED and not self.is_alive():
            raise SandboxLost(self.sandbox_id, "the gVisor container stopped: "
                                               + io.stderr.decode(errors="replace")[-300:])
        result = ExecResult(None if timed_out else returncode, io.stdout, io.stderr,
                            timed_out, io.truncated, io.duration_s,
                            oom_killed=self.cgroup.oom_kills() > oom_before)
        self.write_journal(request, result)
        return result

    def open_session(self, kind: SessionKind = "bash") -> SessionHandle:
        if kind not in SESSION_ARGV:
            raise InvalidSpec(f"session kind={kind!r} is unknown; use 'bash' or 'python'")
        role = f"session-{uuid.uuid4().hex[:8]}"
        pipes = StdioPipes()
        process, pid_file = pipes.start(lambda *stdio: self._start_process(
            SESSION_ARGV[kind], None, {}, *stdio))
        session = PipeSession(kind, self.sandbox_id, pipes.stdin_w, pipes.stdout_r,
                              pipes.stderr_r, lambda: self._end_session(role, process, pid_file))
        # The first run returns once the shell has started, so its pid file exists afterwards.
        session.run("true" if kind == "bash" else "pass", timeout_s=RUNSC_TIMEOUT_S)
        pid = self._read_pid(pid_file)
        if pid is not None:
            self._protected[role] = pid
        self._sessions.append(session)
        return session

    def _end_session(self, role: str, process: subprocess.Popen, pid_file: str) -> None:
        pid = self._protected.pop(role, None)
        if not self._killed:
            self._kill_tree(pid if pid is not None else self._read_pid(pid_file), set(
                self._process_table()) - {pid or 0})
        process.kill()
        process.wait()
        try:
            os.unlink(pid_file)
        except FileNotFoundError:
            pass

    def is_alive(self) -> bool:
        if self._killed:
            return False
        done = self._runsc("state", self.sandbox_id, check=False)
        try:
            return json.loads(done.stdout).get("status") == "running"
        except ValueError:
            return False

    def stats(self) -> SandboxStats:
        """Return cgroup CPU and memory (Sentry and gofer included) and gVisor's process count.

        The host-side task count would be the Sentry's and gofer's threads, so ``pids`` counts
        the processes inside the sandbox instead.
        """
        host_side = super().stats()
        return dataclasses.replace(host_side, pids=len(self._process_table()))

    # Snapshots and lifecycle ---------------------------------------------------------------
    def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        if kind == "fs":
            return super().snapshot("fs")
        if any(not session.closed for session in self._sessions):
            raise InvalidSpec("close the sandbox's sessions before a full snapshot: their "
                              "host-side pipes cannot be part of a checkpoint")
        target = os.path.join(self.backend.snapshot_dir,
                              f"{self.sandbox_id}-{uuid.uuid4().hex[:8]}")
        image = os.path.join(target, "image")
        os.makedirs(image)
        # "checkpoint --leave-running" of runsc 2022-12 does not return here, so the source
        # stops at the checkpoint and is restored from its own image right after the copy.
        self._runsc("checkpoint", "--image-path", image, self.sandbox_id)
        try:
            subprocess.run(["cp", "-a", os.path.join(self.rw, "upper"), target], check=True)
        finally:
            # The same as "runsc delete -force", without its 2 s of polling here.
            self.cgroup.kill("runsc")
            remove_runsc_state(self.backend.state_dir, self.sandbox_id)
            self.start_runsc(image)
        return SnapshotRef(self.layer, "full", target, self.spec, self.sandbox_id,
                           {"uid": self.uid, "runtime": "runsc"})

    def kill(self) -> None:
        if not self._killed:
            self._killed = True
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        # Killing the cgroup stops the Sentry, gofer and guest at once. "runsc kill --all" and
        # "runsc delete" take about 2 s together here, while all "delete" would still do is
        # remove runsc's state files, which remove_runsc_state deletes directly.
        teardown(self.directory, self.cgroup)
        remove_runsc_state(self.backend.state_dir, self.sandbox_id)


def _descendants(table: dict[int, int], root: int) -> set[int]:
    found = {root} if root in table else set()
    changed = True
    while changed:
        changed = False
        for pid, parent in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                changed = True
    return found


class RunscBackend(ContainerBackend):
    layer = "container"

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.runsc_root = os.path.join(self.state_dir, RUNSC_ROOT)
        os.makedirs(self.runsc_root, exist_ok=True)
        self.runsc_binary = shutil.which("runsc")
        if self.runsc_binary is None:
            raise StartError("gVisor is not installed", layer=self.layer,
                             detail="install the runsc package (scripts/install-system-deps)")

    def runsc_command(self) -> list[str]:
        # ptrace works without KVM; "shared" file access makes host-side writes of the file
        # plane visible inside the sandbox at once.
        return [self.runsc_binary or "runsc", "--root", self.runsc_root, "--platform=ptrace",
                "--network=none", "--ignore-cgroups", "--file-access=shared"]

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            layer=cls.layer, snapshot_fs=True, snapshot_full=True, fork=True, pause=True,
            limits=("cpu", "memory", "pids", "disk", "output"),
            isolation="gVisor user-space kernel (runsc, ptrace platform) over an overlay root, "
                      "cgroup limits on the Sentry and gofer",
            notes="exec costs about 0.1 s (runsc exec); a full snapshot keeps processes and "
                  "memory; sessions must be closed before a full snapshot")

    @classmethod
    def probe(cls) -> ProbeResult:
        result = ContainerBackend.probe()
        reasons = list(result.reasons)
        if shutil.which("runsc") is None:
            reasons.append("runsc is not installed; run scripts/install-system-deps")
        return ProbeResult("container", not reasons, tuple(reasons), result.details)

    def create(self, sandbox_id: str, spec: SandboxSpec) -> RunscSandbox:
        return self._start_runsc(RunscSandbox(sandbox_id, spec, self), None)

    def restore(self, sandbox_id: str, ref: SnapshotRef) -> RunscSandbox:
        if ref.layer != self.layer:
            return super().restore(sandbox_id, ref)
        return self._start_runsc(RunscSandbox(sandbox_id, ref.spec, self), ref)

    def _start_runsc(self, sandbox: RunscSandbox, ref: SnapshotRef | None) -> RunscSandbox:
        def start() -> None:
            if ref is None:
                sandbox.start()
                sandbox.start_runsc()
                return
            sandbox.start(os.path.join(ref.path, "upper"), ref.meta.get("uid"))
            sandbox.start_runsc(os.path.join(ref.path, "image") if ref.kind == "full" else None)

        return start_or_clean_up(sandbox, start, "gVisor container failed to start")

"""Function layer: a warm zygote per sandbox forks one child per call.

Each sandbox has its own mount, network (loopback only, down), IPC and UTS namespaces. Calls
run chrooted in a tmpfs root (size = ``disk_mb``) that exposes only the host's ``/usr`` and Python
installation, read-only. Each call also gets a per-sandbox unprivileged uid, rlimits, the
seccomp deny-list, and a cgroup leaf under the sandbox's memory, pids and CPU limits. The host reads
the output and kills the leaf at the deadline. Files written under the workdir persist between
calls; each call also gets a fresh scratch directory (``$TMPDIR``) that is removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Literal

from dsv4.sandbox import cgroups, images, mounts, naming
from dsv4.sandbox.backends.base import Backend, ProbeResult
from dsv4.sandbox.backends.host_root import HostRootSandbox, start_or_clean_up
from dsv4.sandbox.errors import NotSupported, RemoteError, SandboxLost, StartError
from dsv4.sandbox.procio import pump
from dsv4.sandbox.rootfs_files import RootFiles
from dsv4.sandbox.types import (Capabilities, ExecRequest, ExecResult, SandboxSpec, SandboxStats,
                                SnapshotRef)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STATUS_TIMEOUT_S = 10.0
UID_BASE = 200_000
UID_RANGE = 50_000


def sandbox_uid(sandbox_id: str) -> int:
    """Return the host uid the sandbox's calls run as (distinct per sandbox, modulo collisions)."""
    digest = int(hashlib.sha256(sandbox_id.encode()).hexdigest()[:8], 16)
    return UID_BASE + digest % UID_RANGE


class FunctionSandbox(HostRootSandbox):
    layer = "function"

    def __init__(self, sandbox_id: str, spec: SandboxSpec, backend: "FunctionBackend") -> None:
        super().__init__(sandbox_id, spec)
        self.directory = os.path.join(backend.state_dir, sandbox_id)
        self.root = os.path.join(self.directory, "root")
        self.uid = sandbox_uid(sandbox_id)
        self.cgroup = cgroups.SandboxCgroup(backend.layout, sandbox_id)
        self.files = RootFiles(self.root, (self.uid, self.uid))
        self.created = time.monotonic()
        self._lock = threading.Lock()
        self._calls = 0
        self.backend = backend
        self._control: socket.socket | None = None
        self._zygote_pid = 0
        self._zygote_fd = -1
        self._dead_reason = ""
        self._paused = False

    def start(self, root_from: str | None = None, previous_uid: int | None = None) -> None:
        """Mount the root, start the zygote; ``root_from`` is a snapshot's copy of a root."""
        spec = self.spec
        if spec.image != "host":
            raise NotSupported(self.layer, f"image={spec.image!r}",
                               "function sandboxes always use the host image")
        os.makedirs(self.root)
        mounts.mount("tmpfs", self.root, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV,
                     f"size={spec.disk_mb}m,mode=0755")
        images.build_minimal_root(self.root, self.uid, self.uid, spec.workdir)
        if root_from:
            subprocess.run(["cp", "-a", f"{root_from}/.", self.root], check=True)
            if previous_uid is not None and previous_uid != self.uid:
                subprocess.run(["chown", "-R", "-h", f"--from={previous_uid}:{previous_uid}",
                                f"{self.uid}:{self.uid}", self.root], check=True)

        self.cgroup.create(cpu=spec.cpu, memory_bytes=spec.memory_mb << 20, pids=spec.pids)
        # The Python installation is bound at its host path so imports resolve inside the
        # chroot. NOTE: a virtualenv under the workdir path (e.g. /work/...) therefore shows up
        # read-only inside the sandbox's workdir.
        readonly = list(images.HOST_READONLY)
        for prefix in {sys.base_prefix, sys.prefix}:
            if not prefix.startswith("/usr"):
                readonly.append(prefix)
        config = {
            "root": self.root, "uid": self.uid, "gid": self.uid, "workdir": spec.workdir,
            "readonly": readonly, "devices": list(images.DEVICES),
            "hostname": naming.short_name(self.sandbox_id), "env": dict(spec.env),
            "pids": spec.pids, "memory_bytes": spec.memory_mb << 20,
            "disk_bytes": spec.disk_mb << 20, "cgroup_procs": self.cgroup.leaf("zygote"),
        }

        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = host_end
        try:
            self._zygote_pid = self.backend.fork_zygote(config, zygote_end)
        finally:
            zygote_end.close()
        self._zygote_fd = os.pidfd_open(self._zygote_pid)
        host_end.settimeout(START_TIMEOUT_S)
        try:
            reply = json.loads(host_end.recv(65536) or b"{}")
        except (socket.timeout, ValueError) as error:
            reply = {"ready": False, "error": f"no ready message: {error}"}
        if not reply.get("ready"):
            raise StartError("function sandbox zygote failed to start", layer=self.layer,
                             detail=reply.get("error", "the zygote exited"))
        host_end.settimeout(None)

    # Calls -------------------------------------------------------------------------------
    def _run(self, kind: str, request: ExecRequest, payload: bytes | None) -> tuple[ExecResult,
                                                                                   bytes]:
        if self._dead_reason or self._control is None:
            raise SandboxLost(self.sandbox_id, self._dead_reason or "not started")
        with self._lock:
            self._calls += 1
            role = f"call-{self._calls}"
            procs = self.cgroup.leaf(role)
            oom_before = self.cgroup.oom_kills()
            stdin_r, stdin_w = os.pipe()
            stdout_r, stdout_w = os.pipe()
            stderr_r, stderr_w = os.pipe()
            child_fds = [stdin_r, stdout_w, stderr_w]
            extra: tuple[int, ...] = ()
            if kind == "call":
                result_r, result_w = os.pipe()
                child_fds.append(result_w)
                extra = (result_r,)
            message = pickle.dumps({
                "kind": kind, "argv": list(request.argv), "cwd": request.cwd,
                "env": dict(request.env), "timeout_s": request.timeout_s, "payload": payload,
                "cgroup_procs": procs, "number": self._calls})
            try:
                socket.send_fds(self._control, [message], child_fds)
                if self._expect("pid", STATUS_TIMEOUT_S) is None:
                    raise SandboxLost(self.sandbox_id, "the zygote did not start the call")
            except (OSError, SandboxLost) as error:
                self._mark_dead(f"zygote control channel failed: {error}")
                for fd in (*child_fds, stdin_w, stdout_r, stderr_r, *extra):
                    os.close(fd)
                raise SandboxLost(self.sandbox_id, self._dead_reason) from error
            for fd in child_fds:
                os.close(fd)
            io, extras = pump(stdout_r, stderr_r, stdin_fd=stdin_w, stdin=request.stdin,
                              timeout_s=request.timeout_s, max_output=request.max_output,
                              idle_timeout_s=request.idle_timeout_s,
                              on_deadline=lambda: self.cgroup.kill(role), extra_fds=extra)
            # A child can close its output and keep running, so the pipes reaching EOF does
            # not end the call. Its exit status is awaited until the deadline, then the leaf
            # is killed.
            timed_out = io.timed_out
            remaining = max(0.0, request.timeout_s - io.duration_s)
            reply = self._expect("status", remaining)
            if reply is None:
                timed_out = True
                self.cgroup.kill(role)
                reply = self._expect("status", STATUS_TIMEOUT_S)
            if reply is None:
                self._mark_dead("the zygote sent no exit status after the call was killed")
                raise SandboxLost(self.sandbox_id, self._dead_reason)
            status = reply["status"]
            self.cgroup.kill(role)          # reap anything the call left running
            oom_killed = self.cgroup.oom_kills() > oom_before
            self.cgroup.remove_leaf(role)
            shutil.rmtree(os.path.join(self.root, "tmp", role), ignore_errors=True)
            exit_code = None if timed_out else _exit_code(status)
            result = ExecResult(exit_code, io.stdout, io.stderr, timed_out, io.truncated,
                                io.duration_s, oom_killed=oom_killed)
            self.write_journal(request, result)
            return result, extras.get(extra[0], b"") if extra else b""

    def _expect(self, key: str, wait_s: float) -> dict | None:
        """Return the zygote's next message (which must contain ``key``), or None on timeout.

        While the sandbox is paused the zygote cannot reply, so the wait does not count.
        """
        control = self._control
        if control is None:
            raise SandboxLost(self.sandbox_id, self._dead_reason or "not started")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                control.settimeout(max(0.01, deadline - time.monotonic()))
                data = control.recv(65536)
                control.settimeout(None)
                break
            except socket.timeout:
                if self._paused:
                    deadline = time.monotonic() + wait_s
                    continue
                if time.monotonic() >= deadline:
                    return None
            except OSError:
                data = b""        # kill() closed the socket meanwhile
                break
        if not data:
            raise SandboxLost(self.sandbox_id, self._dead_reason
                              or f"zygote sent no {key!r} message")
        reply = json.loads(data)
        if key not in reply:
            raise SandboxLost(self.sandbox_id, f"zygote sent {reply!r}, expected {key!r}")
        return reply

    def _mark_dead(self, reason: str, log: bool = True) -> None:
        if not self._dead_reason and log:
            logger.error("function sandbox %s lost: %s", self.sandbox_id, reason)
        if not self._dead_reason:
            self._dead_reason = reason

    def exec(self, request: ExecRequest) -> ExecResult:
        return self._run("exec", request, None)[0]

    def call(self, function: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
             max_output: int = 1 << 20, **kwargs: Any) -> tuple[Any, ExecResult]:
        """Run ``function(*args, **kwargs)`` in a forked child; return (value, output).

        ``function`` must be importable by reference (a module-level function). The value
        comes back as JSON, so it must be JSON-serialisable. An exception raised by the
        function is re-raised here as ``RemoteError`` with the sandbox's traceback.
        """
        payload = pickle.dumps((function, args, kwargs))
        request = ExecRequest(["<call>"], timeout_s=timeout_s, max_output=max_output)
        result, raw = self._run("call", request, payload)
        if result.timed_out or not raw:
            return None, result
        reply = json.loads(raw)
        if not reply["ok"]:
            raise RemoteError(reply["error"], remote_traceback=reply.get("traceback", ""),
                              result=result)
        return reply["value"], result

    # Lifecycle -------------------------------------------------------------------------------
    def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        """Copy the sandbox's root (workdir, /tmp, /etc changes) while no call runs."""
        if kind != "fs":
            return super().snapshot(kind)
        target = os.path.join(self.backend.snapshot_dir,
                              f"{self.sandbox_id}-{uuid.uuid4().hex[:8]}")
        os.makedirs(target)
        with self._lock:
            subprocess.run(["cp", "-a", self.root, os.path.join(target, "root")], check=True)
        return SnapshotRef(self.layer, "fs", target, self.spec, self.sandbox_id,
                           {"uid": self.uid})

    def pause(self) -> None:
        self._paused = True
        super().pause()

    def resume(self) -> None:
        super().resume()
        self._paused = False

    def stats(self) -> SandboxStats:
        return self.host_stats(self.root)

    def is_alive(self) -> bool:
        if self._dead_reason or self._zygote_fd < 0:
            return False
        # A pidfd becomes readable when its process exits.
        return not select.select([self._zygote_fd], [], [], 0)[0]

    def kill(self) -> None:
        self._mark_dead("killed", log=False)
        if self._control is not None:
            self._control.close()
            self._control = None
        self.cgroup.remove()
        if self._zygote_fd >= 0:
            os.close(self._zygote_fd)
            self._zygote_fd = -1
        teardown(self.directory, self.cgroup)


def _exit_code(status: int) -> int:
    """Return the exit code, or -N when the child was killed by signal N (like subprocess)."""
    return os.waitstatus_to_exitcode(status)


def teardown(directory: str, cgroup: cgroups.SandboxCgroup) -> None:
    """Remove the mounts, cgroups and files of one sandbox. Safe to call repeatedly."""
    cgroup.remove()
    mounts.unmount_all_under(directory)
    shutil.rmtree(directory, ignore_errors=True)


class FunctionBackend(Backend):
    layer = "function"

    def __init__(self, state_dir: str) -> None:
        super().__init__(os.path.join(state_dir, "function"))
        self.snapshot_dir = os.path.join(state_dir, "snapshots", "function")
        os.makedirs(self.state_dir, exist_ok=True)
        os.makedirs(self.snapshot_dir, exist_ok=True)
        self.layout = cgroups.detect_layout()
        self._master: subprocess.Popen | None = None
        self._master_control: socket.socket | None = None
        self._master_lock = threading.Lock()

    def _start_master(self) -> None:
        host_end, master_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "dsv4.sandbox.backends.function_zygote",
                str(master_end.fileno())]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._master = subprocess.Popen(argv, pass_fds=[master_end.fileno()],
                                        stdin=subprocess.DEVNULL, env=env)
        master_end.close()
        self._master_control = host_end

    def fork_zygote(self, config: dict, control: socket.socket) -> int:
        """Ask the warm master zygote to fork a zygote for one sandbox; return its pid."""
        with self._master_lock:
            if self._master is None or self._master.poll() is not None:
                self._start_master()
            assert self._master_control is not None
            socket.send_fds(self._master_control, [json.dumps(config).encode()],
                            [control.fileno()])
            self._master_control.settimeout(START_TIMEOUT_S)
            try:
                reply = self._master_control.recv(65536)
            except socket.timeout:
                reply = b""
            finally:
                self._master_control.settimeout(None)
        if not reply:
            raise StartError("the function layer's master zygote did not reply",
                             layer=self.layer, detail=f"master exit status {self._master.poll()}")
        return json.loads(reply)["pid"]

    def close(self) -> None:
        with self._master_lock:
            if self._master_control is not None:
                self._master_control.close()
                self._master_control = None
            if self._master is not None:
                try:
                    self._master.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._master.kill()
                    self._master.wait()
                self._master = None

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            layer=cls.layer, sessions=False, snapshot_fs=True, fork=True, pause=True,
            limits=("cpu", "memory", "pids", "disk", "output"),
            isolation="fork per call from a warm zygote; mount/net/ipc/uts namespaces, chroot, "
                      "unprivileged uid, rlimits, seccomp, cgroup leaf per call",
            notes="no persistent processes between calls; workdir files persist")

    @classmethod
    def probe(cls) -> ProbeResult:
        from dsv4.sandbox.probe import probe_function
        return probe_function()

    def create(self, sandbox_id: str, spec: SandboxSpec) -> FunctionSandbox:
        sandbox = FunctionSandbox(sandbox_id, spec, self)
        return start_or_clean_up(sandbox, sandbox.start, "function sandbox failed to start")

    def restore(self, sandbox_id: str, ref: SnapshotRef) -> FunctionSandbox:
        if ref.layer != self.layer or ref.kind != "fs":
            return super().restore(sandbox_id, ref)
        sandbox = FunctionSandbox(sandbox_id, ref.spec, self)
        return start_or_clean_up(
            sandbox, lambda: sandbox.start(os.path.join(ref.path, "root"), ref.meta.get("uid")),
            "function sandbox failed to restore")

    def reap(self, live_ids: set[str]) -> list[str]:
        found = set(os.listdir(self.state_dir)) | cgroups.list_sandbox_cgroups(self.layout)
        host_state = os.path.dirname(self.state_dir)
        orphans = sorted(i for i in found if i not in live_ids and naming.is_owned(i, host_state))
        for sandbox_id in orphans:
            logger.info("reaping orphaned function sandbox %s", sandbox_id)
            teardown(os.path.join(self.state_dir, sandbox_id),
                     cgroups.SandboxCgroup(self.layout, sandbox_id))
        return orphans

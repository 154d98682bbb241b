"""Container layer: bubblewrap namespaces over an overlay root, with cgroup limits and seccomp.

Per sandbox the host mounts a tmpfs (size = ``disk_mb``) holding the minimal root and the
overlay's upper and work directories, then an overlay of the image layers at ``merged``.
bubblewrap 0.8 has no overlay options, so the host mounts the overlay itself and binds it as
``/``. Every exec and session is one bubblewrap process. It first joins its own cgroup leaf, then
drops to the sandbox's unprivileged host uid, which is root inside a new user namespace. It
enters new user, pid, net, ipc, uts and mount namespaces and loads the seccomp filter. Files and
``/tmp`` persist across execs; processes do not outlive their exec (use a session for that).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from typing import Literal

from dsv4.sandbox import cgroups, images, mounts, naming
from dsv4.sandbox.backends.base import Backend, ProbeResult, SessionHandle, SessionKind
from dsv4.sandbox.backends.host_root import HostRootSandbox, start_or_clean_up
from dsv4.sandbox.backends.function import sandbox_uid, teardown
from dsv4.sandbox.errors import InvalidSpec, SandboxLost
from dsv4.sandbox.procio import StdioPipes, pump
from dsv4.sandbox.rootfs_files import RootFiles
from dsv4.sandbox.seccomp_filter import write_bpf
from dsv4.sandbox.sessions import SESSION_ARGV, PipeSession
from dsv4.sandbox.types import (Capabilities, ExecRequest, ExecResult, SandboxSpec, SandboxStats,
                                SnapshotRef)

logger = logging.getLogger(__name__)

WAIT_AFTER_KILL_S = 5.0
RUNSC_ROOT = "runsc-root"      # gVisor state directory under the container state dir


class ContainerSandbox(HostRootSandbox):
    layer = "container"
    host_pids_overhead = 0      # host tasks of the runtime itself, added to the pids limit
    host_memory_overhead_mb = 0  # memory of the runtime itself, added to the memory limit

    def __init__(self, sandbox_id: str, spec: SandboxSpec, backend: "ContainerBackend") -> None:
        super().__init__(sandbox_id, spec)
        self.backend = backend
        self.directory = os.path.join(backend.state_dir, sandbox_id)
        self.rw = os.path.join(self.directory, "rw")
        self.merged = os.path.join(self.directory, "merged")
        self.uid = sandbox_uid(sandbox_id)
        self.cgroup = cgroups.SandboxCgroup(backend.layout, sandbox_id)
        self.files = RootFiles(self.merged, (self.uid, self.uid))
        self.created = time.monotonic()
        self._lock = threading.Lock()
        self._counter = 0
        self._sessions: list[SessionHandle] = []
        self._killed = False
        self._processes: dict[str, subprocess.Popen] = {}

    def start(self, upper_from: str | None = None, previous_uid: int | None = None) -> None:
        spec = self.spec
        layers = images.parse_image(spec.image)
        for path in (self.rw, self.merged):
            os.makedirs(path)
        layers = [self._mount_image_file(index, layer) if os.path.isfile(layer) else layer
                  for index, layer in enumerate(layers)]

        mounts.mount("tmpfs", self.rw, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV,
                     f"size={spec.disk_mb}m,mode=0755")
        base, upper, work = (os.path.join(self.rw, name) for name in ("base", "upper", "work"))
        os.makedirs(base)
        images.build_minimal_root(base, self.uid, self.uid, spec.workdir)
        # Root inside the user namespace maps to self.uid, so it owns the whole skeleton.
        for dirpath, dirnames, filenames in os.walk(base):
            for name in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, name), self.uid, self.uid, follow_symlinks=False)
        if upper_from:
            subprocess.run(["cp", "-a", upper_from, upper], check=True)
            if previous_uid is not None and previous_uid != self.uid:
                subprocess.run(["chown", "-R", "-h", f"--from={previous_uid}:{previous_uid}",
                                f"{self.uid}:{self.uid}", upper], check=True)
        else:
            os.makedirs(upper)

        os.makedirs(work)
        os.chown(upper, self.uid, self.uid)
        lower = ":".join([*layers, base])
        mounts.mount("overlay", self.merged, "overlay", mounts.MS_NOSUID | mounts.MS_NODEV,
                     f"lowerdir={lower},upperdir={upper},workdir={work}")
        self.cgroup.create(cpu=spec.cpu,
                           memory_bytes=(spec.memory_mb + self.host_memory_overhead_mb) << 20,
                           pids=spec.pids + self.host_pids_overhead)

    def _mount_image_file(self, index: int, path: str) -> str:
        """Loop-mount an erofs or squashfs layer read-only; return the mount point.

        The mount sits under the sandbox directory, so teardown and the reaper unmount it, and
        mount(8) sets up the loop device with autoclear, so it is freed with the mount.
        """
        target = os.path.join(self.directory, "layers", str(index))
        os.makedirs(target)
        fstype = "erofs" if path.endswith(".erofs") else "squashfs"
        subprocess.run(["mount", "-t", fstype, "-o", "loop,ro,nodev,nosuid", path, target],
                       check=True, capture_output=True)
        return target

    # Process start -------------------------------------------------------------------------
    def _next_role(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def _spawn(self, role: str, argv: list[str], cwd: str | None, env: dict[str, str],
               stdin: int, stdout: int, stderr: int) -> subprocess.Popen:
        if self._killed:
            raise SandboxLost(self.sandbox_id, "killed")
        seccomp_fd = os.open(self.backend.seccomp_path, os.O_RDONLY)
        try:
            bwrap = [
                "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
                "--uid", "0", "--gid", "0", "--hostname", naming.short_name(self.sandbox_id),
                "--bind", self.merged, "/", "--ro-bind", "/usr", "/usr",
                "--proc", "/proc", "--dev", "/dev", "--chdir", cwd or self.spec.workdir,
                "--seccomp", str(seccomp_fd), "--", *argv]
            command = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}",
                       "--clear-groups", *bwrap]
            full_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.spec.workdir,
                        "LANG": "C.UTF-8", **self.spec.env, **env}
            process = subprocess.Popen(cgroups.join_command(self.cgroup.leaf(role), command),
                                       stdin=stdin, stdout=stdout, stderr=stderr, env=full_env,
                                       pass_fds=[seccomp_fd])
            self._processes[role] = process
            return process
        finally:
            os.close(seccomp_fd)

    def _stop(self, role: str) -> None:
        """Kill everything in leaf ``role`` without leaving zombies to the host's init.

        bubblewrap runs as two processes: the outer one (our child) and the init of the new
        pid namespace (its child). Killing both at once through the cgroup orphans the inner
        one, and on hosts whose pid 1 does not reap, it stays a zombie. So the namespace init
        is killed first (the kernel then kills the whole namespace, fork bombs and setsid
        children included), the outer bwrap reaps it and exits, and only then does the
        cgroup kill sweep up anything left.
        """
        for pid in self.cgroup.pids(role):
            if _is_namespace_init(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        process = self._processes.get(role)
        if process is not None:
            try:
                process.wait(timeout=WAIT_AFTER_KILL_S)
            except subprocess.TimeoutExpired:
                logger.warning("sandbox %s: bwrap of %s did not exit after its namespace "
                               "was killed", self.sandbox_id, role)
        self.cgroup.kill(role)
        if process is not None:
            process.wait()

    def exec(self, request: ExecRequest) -> ExecResult:
        role = self._next_role("exec")
        oom_before = self.cgroup.oom_kills()

        pipes = StdioPipes()
        process = pipes.start(lambda *stdio: self._spawn(role, list(request.argv), request.cwd,
                                                          dict(request.env), *stdio))
        io, _ = pump(pipes.stdout_r, pipes.stderr_r, stdin_fd=pipes.stdin_w,
                     stdin=request.stdin,
                     timeout_s=request.timeout_s, max_output=request.max_output,
                     idle_timeout_s=request.idle_timeout_s,
                     on_deadline=lambda: self._stop(role))

        # A command can close its output and keep running, so it gets the rest of its deadline
        # to exit before the leaf is killed.
        timed_out = io.timed_out
        try:
            returncode = process.wait(timeout=max(0.0, request.timeout_s - io.duration_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            self._stop(role)
            returncode = process.wait()
        self._stop(role)                     # background children die with their exec
        oom_killed = self.cgroup.oom_kills() > oom_before
        self.cgroup.remove_leaf(role)
        self._processes.pop(role, None)
        if self._killed:
            raise SandboxLost(self.sandbox_id, "killed during exec")
        if returncode == 97 and not timed_out:
            raise SandboxLost(self.sandbox_id, f"failed to join cgroup leaf {role}")
        result = ExecResult(None if timed_out else returncode, io.stdout, io.stderr,
                            timed_out, io.truncated, io.duration_s,
                            oom_killed=oom_killed)
        self.write_journal(request, result)
        return result

    def open_session(self, kind: SessionKind = "bash") -> SessionHandle:
        if kind not in SESSION_ARGV:
            raise InvalidSpec(f"session kind={kind!r} is unknown; use 'bash' or 'python'")
        role = self._next_role("session")
        pipes = StdioPipes()
        pipes.start(lambda *stdio: self._spawn(role, SESSION_ARGV[kind], None, {}, *stdio))

        def kill_session() -> None:
            self._stop(role)
            self.cgroup.remove_leaf(role)
            self._processes.pop(role, None)

        session = PipeSession(kind, self.sandbox_id, pipes.stdin_w, pipes.stdout_r,
                              pipes.stderr_r, kill_session)
        self._sessions.append(session)
        return session

    # Snapshot and lifecycle ------------------------------------------------------------------
    def snapshot(self, kind: Literal["fs", "full"] = "fs") -> SnapshotRef:
        if kind != "fs":
            return super().snapshot(kind)
        target = os.path.join(self.backend.snapshot_dir,
                              f"{self.sandbox_id}-{uuid.uuid4().hex[:8]}")
        os.makedirs(target)
        self.cgroup.freeze(True)     # a consistent copy: nothing writes while it is taken
        try:
            subprocess.run(["cp", "-a", os.path.join(self.rw, "upper"), target], check=True)
        finally:
            self.cgroup.freeze(False)
        return SnapshotRef(self.layer, "fs", target, self.spec, self.sandbox_id,
                           {"uid": self.uid})

    def stats(self) -> SandboxStats:
        return self.host_stats(self.rw)

    def is_alive(self) -> bool:
        return not self._killed and os.path.ismount(self.merged)

    def kill(self) -> None:
        self._killed = True
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        for role in list(self._processes):
            self._stop(role)
        teardown(self.directory, self.cgroup)


def remove_runsc_state(state_dir: str, sandbox_id: str) -> None:
    """Delete gVisor's bookkeeping files of one sandbox (``<id>_sandbox:<id>.state``, ...)."""
    root = os.path.join(state_dir, RUNSC_ROOT)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(sandbox_id):
                path = os.path.join(root, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)


def _is_namespace_init(pid: int) -> bool:
    """Return True when ``pid`` is pid 1 of a nested pid namespace (the NSpid line ends in 1)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    parts = line.split()[1:]
                    return len(parts) > 1 and parts[-1] == "1"
    except OSError:
        pass
    return False


class ContainerBackend(Backend):
    layer = "container"

    def __init__(self, state_dir: str) -> None:
        super().__init__(os.path.join(state_dir, "container"))
        self.snapshot_dir = os.path.join(state_dir, "snapshots", "container")
        os.makedirs(self.state_dir, exist_ok=True)
        os.makedirs(self.snapshot_dir, exist_ok=True)
        # The sandbox uid must be able to reach its root through these directories.
        for path in (state_dir, self.state_dir):
            os.chmod(path, 0o755)
        self.layout = cgroups.detect_layout()
        self.seccomp_path = write_bpf(os.path.join(self.state_dir, "seccomp.bpf"))

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            layer=cls.layer, snapshot_fs=True, fork=True, pause=True,
            limits=("cpu", "memory", "pids", "disk", "output"),
            isolation="bubblewrap user/pid/net/ipc/uts/mount namespaces, overlay root, "
                      "unprivileged host uid, cgroup limits, seccomp",
            notes="full snapshots need the runsc runtime (not in this backend); "
                  "processes live only as long as their exec or session")

    @classmethod
    def probe(cls) -> ProbeResult:
        from dsv4.sandbox.probe import probe_container
        return probe_container()

    def create(self, sandbox_id: str, spec: SandboxSpec) -> ContainerSandbox:
        return self._start(ContainerSandbox(sandbox_id, spec, self), None, None)

    def restore(self, sandbox_id: str, ref: SnapshotRef) -> ContainerSandbox:
        if ref.layer != self.layer or ref.kind != "fs":
            return super().restore(sandbox_id, ref)
        sandbox = ContainerSandbox(sandbox_id, ref.spec, self)
        return self._start(sandbox, os.path.join(ref.path, "upper"), ref.meta.get("uid"))

    def _start(self, sandbox: ContainerSandbox, upper_from: str | None,
               previous_uid: int | None) -> ContainerSandbox:
        return start_or_clean_up(sandbox, lambda: sandbox.start(upper_from, previous_uid),
                                 "container sandbox failed to start")

    def reap(self, live_ids: set[str]) -> list[str]:
        found = {n for n in os.listdir(self.state_dir) if naming.is_owned(n, os.path.dirname(
            self.state_dir))}
        found |= cgroups.list_sandbox_cgroups(self.layout)
        runsc_root = os.path.join(self.state_dir, RUNSC_ROOT)
        if os.path.isdir(runsc_root):
            found |= {name.split("_")[0] for name in os.listdir(runsc_root)}
        host_state = os.path.dirname(self.state_dir)
        orphans = sorted(i for i in found if i not in live_ids and naming.is_owned(i, host_state))
        for sandbox_id in orphans:
            logger.info("reaping orphaned container sandbox %s", sandbox_id)
            teardown(os.path.join(self.state_dir, sandbox_id),
                     cgroups.SandboxCgroup(self.layout, sandbox_id))
            remove_runsc_state(self.state_dir, sandbox_id)
        return orphans

"""The warm parent ("zygote") of one function-layer sandbox; run as a separate process.

Start-up (once per sandbox): enter new mount, network, IPC and UTS namespaces, bind the host's
``/usr`` and the Python installation read-only into the sandbox root (a tmpfs the host mounted),
mount ``/proc`` with ``hidepid=2`` and import what calls will need.

Per request, the zygote forks a child. The child joins the request's cgroup leaf and takes the
stdio pipes that the host sent over the control socket. It then chroots into the root, drops to
the sandbox uid and applies rlimits and the seccomp filter. Last, it execs the command or runs
the Python callable. The zygote reports
the child's pid and later its exit status. It never enforces deadlines: the host kills the
child's cgroup leaf. The zygote exits when the host closes the control socket.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import resource
import signal
import socket
import sys
import traceback

from dsv4.sandbox import mounts
from dsv4.sandbox.seccomp_filter import build_filter

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
MAX_MESSAGE = 1 << 24

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what} failed: {os.strerror(code)}")


def _setup(config: dict) -> None:
    root = config["root"]
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
    for source in config["readonly"]:
        target = os.path.join(root, source.lstrip("/"))
        os.makedirs(target, exist_ok=True)
        mounts.bind_readonly(source, target)
    for device in config["devices"]:
        mounts.mount(f"/dev/{device}", os.path.join(root, "dev", device), None, mounts.MS_BIND)
    mounts.mount("proc", os.path.join(root, "proc"), "proc",
                 mounts.MS_NOSUID | mounts.MS_NODEV, "hidepid=2")
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    hostname = config["hostname"].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")


def _apply_limits(config: dict, request: dict) -> None:
    limits = {
        resource.RLIMIT_NPROC: config["pids"],
        resource.RLIMIT_NOFILE: 1024,
        resource.RLIMIT_FSIZE: config["disk_bytes"],
        resource.RLIMIT_CORE: 0,
        # A backstop only: the host kills the cgroup leaf at the deadline.
        resource.RLIMIT_CPU: int(request["timeout_s"]) + 2,
    }
    if request["kind"] == "call":
        # RLIMIT_AS makes a Python MemoryError out of a large allocation, which is a clearer
        # failure than the cgroup OOM kill. It is skipped for exec, where runtimes such as the
        # JVM reserve far more address space than they use.
        limits[resource.RLIMIT_AS] = config["memory_bytes"]
    for key, value in limits.items():
        resource.setrlimit(key, (value, value))


def _run_child(config: dict, request: dict, fds: list[int], syscall_filter) -> None:
    """Body of the forked child; never returns."""
    try:
        for path in request["cgroup_procs"]:
            with open(path, "w") as handle:
                handle.write(str(os.getpid()))
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        result_fd = None
        if len(fds) > 3:
            result_fd = os.dup2(fds[3], 3, inheritable=False)
        for fd in fds:
            if fd > 3:
                os.close(fd)
        target = None
        if request["kind"] == "call":
            # Unpickle before chroot so the callable's module is importable from host paths.
            target, args, kwargs = pickle.loads(request["payload"])
        scratch = os.path.join(config["root"], "tmp", f"call-{request['number']}")
        os.makedirs(scratch, exist_ok=True)
        os.chown(scratch, config["uid"], config["gid"])
        os.chroot(config["root"])
        os.chdir(request["cwd"] or config["workdir"])
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
        _apply_limits(config, request)
        syscall_filter.load()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": config["workdir"],
               "TMPDIR": scratch[len(config["root"]):], "LANG": "C.UTF-8",
               **config["env"], **request["env"]}
        if request["kind"] == "exec":
            os.execvpe(request["argv"][0], request["argv"], env)
        os.environ.clear()
        os.environ.update(env)
        try:
            value = target(*args, **kwargs)
            reply = {"ok": True, "value": value}
        except BaseException as error:  # noqa: BLE001 - reported to the caller as data
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc()}
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            encoded = json.dumps(reply).encode()
        except (TypeError, ValueError) as error:
            encoded = json.dumps({"ok": False, "error": f"result is not JSON-serialisable: "
                                                         f"{error}", "traceback": ""}).encode()
        if result_fd is not None:
            os.write(result_fd, encoded)
        os._exit(0)
    except BaseException as error:  # noqa: BLE001 - the child must never return
        try:
            os.write(2, f"sandbox: failed to start the command: {error}\n".encode())
        finally:
            os._exit(127)


def _reap_all_children() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def serve(control: socket.socket, config: dict, syscall_filter) -> None:
    control.send(json.dumps({"ready": True}).encode())
    while True:
        message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 8)
        if not message:
            return
        request = pickle.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            _run_child(config, request, fds, syscall_filter)
        for fd in fds:
            os.close(fd)
        control.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        control.send(json.dumps({"status": status}).encode())
        # The zygote is a child subreaper, so the call's orphaned descendants are its children
        # now. The host kills the call's cgroup leaf after the status message, and the zygote
        # reaps them here, so no zombie passes to the host's init when the zygote exits.
        _reap_all_children()


def _run_sandbox_zygote(control: socket.socket, config: dict, syscall_filter) -> None:
    """Body of a forked per-sandbox zygote; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for path in config["cgroup_procs"]:
            with open(path, "w") as handle:
                handle.write(str(os.getpid()))
        _setup(config)
    except OSError as error:
        control.send(json.dumps({"ready": False, "error": str(error)}).encode())
        os._exit(1)
    try:
        serve(control, config, syscall_filter)
    except (ConnectionError, EOFError):
        pass
    except BaseException as error:  # noqa: BLE001 - report, then exit without unwinding
        sys.stderr.write(f"sandbox zygote {config['hostname']} failed: {error!r}\n")
        code = 1
    os._exit(code)


def _reap_exited(signum: int, frame) -> None:
    """SIGCHLD handler of the master: reap per-sandbox zygotes that exited."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    """Run the master zygote: fork one per-sandbox zygote per request from the host.

    The master imports everything once, so a new sandbox costs a fork instead of an
    interpreter start. Requests carry the sandbox config and the sandbox's control socket.
    """
    control = socket.socket(fileno=int(sys.argv[1]))
    syscall_filter = build_filter()
    signal.signal(signal.SIGCHLD, _reap_exited)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
        except ConnectionError:
            return
        if not message:
            return
        config = json.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            _run_sandbox_zygote(socket.socket(fileno=fds[0]), config, syscall_filter)
        os.close(fds[0])
        control.send(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    main()

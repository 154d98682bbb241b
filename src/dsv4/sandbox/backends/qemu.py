"""QEMU plumbing shared by the microVM and VM layers: command line, QMP, process lifetime.

Each VM owns a run directory named after its sandbox id. It contains the QMP and serial
sockets, the QEMU log, ``qemu.pid`` and (VM layer) the disk overlay. The process is started
in its own session with ``-name dsv4-<id>``, so the backend's ``reap`` can tell our processes
apart after a crash of the host process and remove them together with their directories.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.sandbox.backends.qemu_agent import AgentChannel, AgentUnresponsive
from dsv4.sandbox.errors import StartError

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
# Unix socket paths must fit in sun_path (108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 100
KERNEL_ARGS = "console=ttyS0 quiet loglevel=1 panic=-1 reboot=t random.trust_cpu=on"


@dataclass(frozen=True)
class MachineConfig:
    """Everything that shapes a VM's command line; a snapshot restores only into an equal one."""

    machine: str                 # "microvm" or "pc"
    accel: str                   # "tcg" or "kvm"
    memory_mb: int
    cpus: int
    kernel: str
    initrd: str
    extra_kernel_args: str = ""
    disk: bool = False           # attach run_dir/disk.qcow2 as virtio-blk (VM layer)
    disk_mb: int = 0             # size of the ext4 root on that disk, MiB

    def key(self) -> str:
        """Return a string that names this configuration in template directories."""
        args = hashlib.sha256(self.kernel_args().encode()).hexdigest()[:8]
        return (f"{self.machine}-{self.accel}-m{self.memory_mb}-c{self.cpus}"
                f"{f'-disk{self.disk_mb}' if self.disk else ''}-{args}")

    def kernel_args(self) -> str:
        args = [KERNEL_ARGS, self.extra_kernel_args]
        if self.accel == "tcg":
            khz = host_tsc_khz()
            # Under TCG the guest TSC ticks at the host TSC rate. The guest's own calibration
            # against the PIT fails when the host deschedules QEMU during the measurement, and
            # the boot then hangs without a clocksource, so the host passes the rate in.
            if khz:
                args.append(f"tsc_early_khz={khz} tsc=reliable")
        return " ".join(arg for arg in args if arg)


def host_tsc_khz() -> int | None:
    """Return the host CPU clock in kHz from /proc/cpuinfo (the TSC rate on x86), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def qemu_command(config: MachineConfig, name: str, run_dir: Path, sockets: Path,
                 incoming: Path | None = None) -> list[str]:
    """Return the QEMU argv for ``config``; ``incoming`` restores memory from that file."""
    if config.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg", "-cpu", "max"]
    argv = [QEMU_BINARY, "-name", f"{name},process={name}", "-M", config.machine, *accel,
            "-m", str(config.memory_mb), "-smp", str(config.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"socket,id=ser0,path={sockets / 'serial.sock'},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{sockets / 'qmp.sock'},server=on,wait=off",
            "-kernel", config.kernel, "-initrd", config.initrd,
            "-append", config.kernel_args()]
    if config.disk:
        argv += ["-drive", f"if=none,id=root,file={run_dir / 'disk.qcow2'},format=qcow2",
                 "-device", "virtio-blk-pci,drive=root"]
    if incoming is not None:
        # "exec:" lets several VMs restore from one read-only state file at the same time.
        argv += ["-incoming", f"exec:cat {_shell_quote(str(incoming))}"]
    return argv


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


class QmpClient:
    """Minimal QMP client: one command at a time, asynchronous events are skipped."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.settimeout(timeout_s)
        self._sock = sock
        self._file = sock.makefile("rb")
        self._read_message()                      # greeting
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP socket closed")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise RuntimeError(f"QMP {command} failed: {message['error'].get('desc')}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@dataclass
class QemuMachine:
    """One running QEMU process with its QMP client and guest agent channel."""

    name: str
    config: MachineConfig
    run_dir: Path
    process: subprocess.Popen
    qmp: QmpClient
    agent: AgentChannel
    sockets: Path
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def launch(cls, name: str, config: MachineConfig, run_dir: Path,
               incoming: Path | None = None, boot_timeout_s: float = 180.0) -> "QemuMachine":
        """Start QEMU and wait until the agent responds; kill everything on failure."""
        if shutil.which(QEMU_BINARY) is None:
            raise StartError(f"{QEMU_BINARY} not found", layer=config.machine,
                             detail="install it with 'apt-get install qemu-system-x86'")
        run_dir.mkdir(parents=True, exist_ok=True)
        sockets = socket_dir(name, run_dir)
        sockets.mkdir(parents=True, exist_ok=True)
        argv = qemu_command(config, name, run_dir, sockets, incoming)
        log_file = open(run_dir / "qemu.log", "wb")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        (run_dir / "qemu.pid").write_text(str(process.pid))
        qmp = agent = None
        try:
            qmp = QmpClient(sockets / "qmp.sock")
            agent = AgentChannel(str(sockets / "serial.sock"))
            if incoming is None:
                agent.wait_ready(boot_timeout_s)
            else:
                _wait_incoming(qmp, boot_timeout_s)
                qmp.execute("cont")
                agent.ping(boot_timeout_s)
        except (OSError, ConnectionError, RuntimeError, AgentUnresponsive, json.JSONDecodeError) as exc:
            for client in (agent, qmp):
                if client is not None:
                    client.close()
            stop_process(process)
            tail = _log_tail(run_dir / "qemu.log")
            remove_run_dir(name, run_dir)
            raise StartError(f"QEMU {config.machine} VM {name} failed to start", layer=config.machine,
                             detail=f"{exc}; QEMU log: {tail or '(empty)'}") from exc
        return cls(name=name, config=config, run_dir=run_dir, process=process, qmp=qmp,
                   agent=agent, sockets=sockets)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def save_state(self, path: Path, *, resume: bool) -> None:
        """Stop the guest and write its memory and device state to ``path`` (QMP migrate)."""
        self.qmp.execute("stop")
        tmp = path.with_name(path.name + ".tmp")
        self.qmp.execute("migrate", {"uri": f"exec:cat > {_shell_quote(str(tmp))}"})
        while True:
            status = self.qmp.execute("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"saving the state of VM {self.name} to {path} ended as {status}")
            time.sleep(0.02)
        tmp.rename(path)
        if resume:
            self.qmp.execute("cont")

    def cpu_seconds(self) -> float:
        """Return the user+system CPU time of the QEMU process."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def destroy(self) -> None:
        """Kill QEMU and remove the run directory and sockets. Idempotent."""
        self.agent.close()
        self.qmp.close()
        stop_process(self.process)
        remove_run_dir(self.name, self.run_dir)


def _wait_incoming(qmp: QmpClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while qmp.execute("query-status").get("status") == "inmigrate":
        if time.monotonic() > deadline:
            raise RuntimeError(f"restoring the VM state took more than {timeout_s:g} s")
        time.sleep(0.01)


def socket_dir(name: str, run_dir: Path) -> Path:
    """Return where the VM's sockets live: the run dir unless its path is too long."""
    if len(str(run_dir / "serial.sock")) <= MAX_SOCKET_PATH:
        return run_dir
    return Path("/tmp") / f"{name}.sock.d"


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def remove_run_dir(name: str, run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    sockets = Path("/tmp") / f"{name}.sock.d"
    if sockets.exists():
        shutil.rmtree(sockets, ignore_errors=True)


def _log_tail(path: Path) -> str:
    try:
        return path.read_bytes()[-800:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def find_qemu_pids(name: str) -> list[int]:
    """Return the pids of QEMU processes started for ``name`` (matched on ``-name``)."""
    pids = []
    needle = f"{name},process={name}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def list_qemu_names(prefix: str) -> dict[str, list[int]]:
    """Return ``-name`` values starting with ``prefix`` of running QEMU processes, with pids."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if "-name" not in [arg.decode("utf-8", "replace") for arg in argv[:3]]:
            continue
        name = argv[argv.index(b"-name") + 1].decode("utf-8", "replace").split(",")[0]
        if name.startswith(prefix):
            found.setdefault(name, []).append(int(entry.name))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

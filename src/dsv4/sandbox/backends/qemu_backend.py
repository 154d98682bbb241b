"""Backend base of the microVM and VM layers: accelerator choice, templates, create, reap.

A sandbox starts from a template when it can. The first sandbox of a machine configuration
cold-boots a VM and saves its state to the cache directory. Every later sandbox restores that
state. Under TCG on a loaded 2-core host, QEMU start, state load and guest setup took about 0.3
s, against 3 s or more for a boot. After a restore the host sets the guest's hostname and clock
and feeds fresh host randomness to the guest's entropy pool, so clones of one template do not
share them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

from dsv4.sandbox import naming
from dsv4.sandbox.backends.base import Backend, ProbeResult
from dsv4.sandbox.backends.qemu import (QEMU_BINARY, MachineConfig, QemuMachine, find_qemu_pids,
                                        kill_pids, list_qemu_names, remove_run_dir)
from dsv4.sandbox.backends.qemu_agent import AgentUnresponsive
from dsv4.sandbox.backends.qemu_probe import probe_qemu_layer
from dsv4.sandbox.backends.qemu_sandbox import QemuSandbox
from dsv4.sandbox.errors import InvalidSpec, NotSupported, StartError
from dsv4.sandbox.guest.image import (GuestImage, build_base_disk, build_guest, cache_dir,
                                      cache_lock, touch_entry)
from dsv4.sandbox.types import Capabilities, SandboxSpec, SnapshotRef

log = logging.getLogger(__name__)

# Smallest guest RAM accepted. NOTE: guests below 128 MiB were never tried; the kernel and
# the unpacked initramfs alone take tens of MiB.
MIN_MEMORY_MB = 128
KVM_PROBE_TIMEOUT_S = 20.0
# The guest tree (busybox and modules) takes about 3 MiB of the ext4 root disk.
MIN_DISK_MB = 16


def process_name(sandbox_id: str) -> str:
    """Return the QEMU ``-name`` of a sandbox; ``find_qemu_pids`` matches on it."""
    return f"dsv4-{sandbox_id}"


def kvm_works() -> bool:
    """Return whether QEMU with KVM boots the guest on this host, caching the result.

    /dev/kvm alone is not enough: a PVM host (a KVM variant for nested guests) accepts
    KVM_CREATE_VM but cannot run stock guest kernels, so the probe boots the real guest.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu_version = subprocess.run([QEMU_BINARY, "--version"], capture_output=True,
                                  text=True).stdout.split("\n")[0]
    key = f"{platform.release()}|{qemu_version}"
    record = cache_dir() / "kvm-probe.json"
    with cache_lock("kvm-probe"):
        if record.is_file():
            cached = json.loads(record.read_text())
            if cached.get("key") == key:
                return bool(cached["works"])
        guest = build_guest()
        config = MachineConfig("microvm", "kvm", MIN_MEMORY_MB, 1, str(guest.kernel),
                               str(guest.initrd))
        name = f"dsv4-kvm-probe-{secrets.token_hex(4)}"
        with tempfile.TemporaryDirectory(prefix="dsv4-kvm-probe-") as tmp:
            try:
                QemuMachine.launch(name, config, Path(tmp) / name,
                                   boot_timeout_s=KVM_PROBE_TIMEOUT_S).destroy()
                works, reason = True, "guest agent answered"
            except StartError as exc:
                lines = [line for line in str(exc).splitlines() if "error" in line.lower()]
                works, reason = False, (lines[0] if lines else str(exc))[-300:]
        log.info("KVM probe: %s (%s)", "works" if works else "does not work", reason)
        record.write_text(json.dumps({"key": key, "works": works, "reason": reason}))
        return works


class QemuBackend(Backend):
    """Shared create/restore/reap logic; subclasses pick the machine type and disk use."""

    layer: ClassVar[str]
    machine_type: ClassVar[str]
    uses_disk: ClassVar[bool]
    notes: ClassVar[str] = ""

    @classmethod
    def capabilities(cls) -> Capabilities:
        guest = "kernel and disk" if cls.uses_disk else "kernel"
        return Capabilities(
            layer=cls.layer, sessions=True, snapshot_fs=cls.uses_disk, snapshot_full=True,
            fork=True, pause=True,
            limits=(("memory", "pids", "disk", "output") if cls.uses_disk
                    else ("memory", "pids", "output")),
            isolation=f"QEMU {cls.machine_type} guest with its own {guest} (KVM when it works, "
                      f"else TCG), no network device, commands as an unprivileged guest user",
            notes=cls.notes)

    @classmethod
    def probe(cls) -> ProbeResult:
        return probe_qemu_layer(cls.layer)

    def __init__(self, state_dir: str) -> None:
        super().__init__(os.path.join(state_dir, self.layer))
        self.host_state_dir = state_dir
        self.snapshot_dir = os.path.join(state_dir, "snapshots", self.layer)
        os.makedirs(self.state_dir, exist_ok=True)
        os.makedirs(self.snapshot_dir, exist_ok=True)
        self._live: dict[str, QemuSandbox] = {}
        self._live_lock = threading.Lock()
        self._guest: GuestImage | None = None

    # Configuration ---------------------------------------------------------------------------
    def guest(self) -> GuestImage:
        if self._guest is None:
            self._guest = build_guest()
        return self._guest

    def machine_config(self, spec: SandboxSpec) -> MachineConfig:
        if spec.memory_mb < MIN_MEMORY_MB:
            raise InvalidSpec(f"memory_mb={spec.memory_mb} is too small for a {self.layer} "
                              f"sandbox; use at least {MIN_MEMORY_MB}")
        if self.uses_disk and spec.disk_mb < MIN_DISK_MB:
            raise InvalidSpec(f"disk_mb={spec.disk_mb} is too small for the {self.layer} root "
                              f"disk; use at least {MIN_DISK_MB}")
        accel = spec.options.get("accel", "auto")
        if accel == "auto":
            accel = "kvm" if kvm_works() else "tcg"
        elif accel not in ("kvm", "tcg"):
            raise InvalidSpec(f"options['accel']={accel!r} is unknown; use 'auto', 'kvm' or 'tcg'")
        guest = self.guest()
        return MachineConfig(machine=self.machine_type, accel=accel, memory_mb=spec.memory_mb,
                             cpus=max(1, math.ceil(spec.cpu)), kernel=str(guest.kernel),
                             initrd=str(guest.initrd),
                             extra_kernel_args="dsv4.root=/dev/vda" if self.uses_disk else "",
                             disk=self.uses_disk, disk_mb=spec.disk_mb if self.uses_disk else 0)

    def _prepare_disk(self, config: MachineConfig, run_dir: Path, source: Path | None) -> None:
        """Create the VM's disk overlay: a copy of ``source`` or a fresh overlay on the base."""
        if not self.uses_disk:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if source is not None:
            shutil.copyfile(source, run_dir / "disk.qcow2")
            return
        base = build_base_disk(self.guest(), config.disk_mb)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                        str(run_dir / "disk.qcow2")], check=True, capture_output=True)

    # Templates -------------------------------------------------------------------------------
    def template(self, config: MachineConfig) -> Path:
        """Return the template directory of ``config``, cold-booting it on first use."""
        name = f"template-{self.layer}-{self.guest().digest}-{config.key()}"
        directory = cache_dir() / "templates" / name
        if (directory / "state.bin").is_file():
            touch_entry(directory)
            if self.uses_disk:
                # Keeps the overlay's backing file from pruning.
                build_base_disk(self.guest(), config.disk_mb)
            return directory
        with cache_lock(name):
            if (directory / "state.bin").is_file():
                return directory
            log.info("building %s template %s", self.layer, directory)
            build_dir = Path(tempfile.mkdtemp(prefix="dsv4-template-"))
            run_dir = build_dir / "run"
            try:
                self._prepare_disk(config, run_dir, None)
                machine = QemuMachine.launch(process_name(f"template-{secrets.token_hex(4)}"),
                                             config, run_dir)
                try:
                    if self.uses_disk:
                        machine.agent.run("sync\n", user="root", timeout_s=60)
                    machine.save_state(build_dir / "state.bin", resume=False)
                    if self.uses_disk:
                        shutil.copyfile(run_dir / "disk.qcow2", build_dir / "disk.qcow2")
                finally:
                    machine.destroy()
                directory.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.rmtree(directory, ignore_errors=True)   # left by an interrupted build
                build_dir.rename(directory)
            finally:
                shutil.rmtree(build_dir, ignore_errors=True)
        return directory

    # Create, restore, reap ---------------------------------------------------------------------
    def create(self, sandbox_id: str, spec: SandboxSpec) -> QemuSandbox:
        config = self.machine_config(spec)
        boot = spec.options.get("boot", "template")
        if boot == "cold":
            return self._start(sandbox_id, spec, config, state=None, disk=None)
        if boot != "template":
            raise InvalidSpec(f"options['boot']={boot!r} is unknown; use 'template' or 'cold'")
        template = self.template(config)
        disk = template / "disk.qcow2" if self.uses_disk else None
        return self._start(sandbox_id, spec, config, state=template / "state.bin", disk=disk)

    def restore(self, sandbox_id: str, ref: SnapshotRef) -> QemuSandbox:
        if ref.layer != self.layer:
            raise NotSupported(self.layer, f"restore of a {ref.layer!r} snapshot")
        config = self.machine_config(ref.spec)
        if ref.meta.get("config") not in (None, config.key()):
            raise InvalidSpec(f"snapshot {ref.path} was taken with machine {ref.meta['config']} "
                              f"but this host builds {config.key()}; restore it with the same "
                              f"memory_mb, cpu and accel")
        path = Path(ref.path)
        disk = path / "disk.qcow2" if self.uses_disk else None
        state = path / "state.bin" if ref.kind == "full" else None
        return self._start(sandbox_id, ref.spec, config, state=state, disk=disk)

    def _start(self, sandbox_id: str, spec: SandboxSpec, config: MachineConfig,
               state: Path | None, disk: Path | None) -> QemuSandbox:
        run_dir = Path(self.state_dir) / sandbox_id
        try:
            self._prepare_disk(config, run_dir, disk)
        except (OSError, subprocess.CalledProcessError) as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise StartError(f"creating the disk of sandbox {sandbox_id} failed", layer=self.layer,
                             detail=str(exc)) from exc
        machine = QemuMachine.launch(process_name(sandbox_id), config, run_dir, incoming=state)
        sandbox = QemuSandbox(sandbox_id, spec, machine, self)
        with self._live_lock:
            self._live[sandbox_id] = sandbox
        try:
            self._personalize(sandbox, restored=state is not None)
        except BaseException:
            sandbox.kill()
            raise
        return sandbox

    def _personalize(self, sandbox: QemuSandbox, restored: bool) -> None:
        """Give the guest its own hostname, the host's clock and fresh entropy."""
        try:
            sandbox.machine.agent.hello(naming.short_name(sandbox.sandbox_id), int(time.time()),
                                        os.urandom(64))
        except AgentUnresponsive as exc:
            raise StartError(f"setting up sandbox {sandbox.sandbox_id} failed", layer=self.layer,
                             detail=str(exc)) from exc
        workdir = sandbox.spec.workdir
        if workdir != "/work":       # the guest's rcS creates /work for the sandbox user
            quoted = shlex.quote(workdir)
            result = sandbox._root(f"mkdir -p {quoted} && chown sbx:sbx {quoted}\n")
            if result.exit_code != 0:
                raise StartError(f"creating workdir {workdir} in sandbox {sandbox.sandbox_id} "
                                 f"failed", layer=self.layer,
                                 detail=result.stderr.decode("utf-8", "replace"))
        log.debug("sandbox %s ready (%s)", sandbox.sandbox_id, "restored" if restored else "booted")

    def forget(self, sandbox_id: str) -> None:
        with self._live_lock:
            self._live.pop(sandbox_id, None)

    def reap(self, live_ids: set[str]) -> list[str]:
        with self._live_lock:
            keep = set(live_ids) | set(self._live)
        orphans = {name for name in os.listdir(self.state_dir)
                   if naming.is_owned(name, self.host_state_dir) and name not in keep}
        # A QEMU process can outlive its run directory when a host process died mid-kill.
        prefix = process_name(naming.host_tag(self.host_state_dir) + "-")
        processes = list_qemu_names(prefix)
        for name in processes:
            sandbox_id = name[len(process_name("")):]
            if sandbox_id not in keep and naming.is_owned(sandbox_id, self.host_state_dir):
                orphans.add(sandbox_id)
        for sandbox_id in sorted(orphans):
            log.info("reaping orphaned %s sandbox %s", self.layer, sandbox_id)
            kill_pids(processes.get(process_name(sandbox_id), []))
            remove_run_dir(process_name(sandbox_id), Path(self.state_dir) / sandbox_id)
        return sorted(orphans)

    def residue(self, sandbox_id: str) -> list[str]:
        """Return what is left on the host of ``sandbox_id`` (processes, directories, sockets)."""
        left = [f"process {pid}" for pid in find_qemu_pids(process_name(sandbox_id))]
        for path in (Path(self.state_dir) / sandbox_id,
                     Path("/tmp") / f"{process_name(sandbox_id)}.sock.d"):
            if path.exists():
                left.append(str(path))
        return left

    def close(self) -> None:
        """Templates stay in the cache directory; live sandboxes stay alive."""

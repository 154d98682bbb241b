"""microVM layer: QEMU's ``microvm`` machine booting the guest kernel and initramfs.

KVM is used when a boot probe shows it works, else TCG (software emulation). The guest's
root is the initramfs in guest memory, so snapshots are ``full`` only: QMP ``migrate`` of the
memory and device state to a file. Sandboxes start by restoring a cached template.
"""

from __future__ import annotations

from dsv4.sandbox.backends.base import ProbeResult
from dsv4.sandbox.backends.qemu_backend import QemuBackend
from dsv4.sandbox.types import Capabilities


class MicroVMBackend(QemuBackend):
    layer = "microvm"
    machine_type = "microvm"
    uses_disk = False

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            layer=cls.layer, sessions=False, snapshot_fs=False, snapshot_full=True, fork=True,
            pause=True, limits=("memory", "pids", "output"),
            isolation="QEMU microvm guest with its own kernel (KVM when it works, else TCG), "
                      "no network device, commands as an unprivileged guest user",
            notes="memory_mb is the guest RAM; files live in guest memory; no cpu quota "
                  "beyond the vCPU count; no Firecracker engine")

    @classmethod
    def probe(cls) -> ProbeResult:
        from dsv4.sandbox.backends.qemu_probe import probe_qemu_layer
        return probe_qemu_layer(cls.layer)

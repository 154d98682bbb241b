"""Full VM layer: QEMU's ``pc`` machine (BIOS, PCI) with an ext4 root on a qcow2 overlay.

Each VM writes to its own qcow2 overlay on a cached base disk. The initramfs loads the virtio
block drivers and switches to the disk root. Snapshot ``fs`` is a copy of the overlay after a
guest ``sync``; snapshot ``full`` adds the memory and device state (QMP ``migrate`` to file).
"""

from __future__ import annotations

from dsv4.sandbox.backends.base import ProbeResult
from dsv4.sandbox.backends.qemu_backend import QemuBackend
from dsv4.sandbox.types import Capabilities


class VMBackend(QemuBackend):
    layer = "vm"
    machine_type = "pc"
    uses_disk = True

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            layer=cls.layer, sessions=False, snapshot_fs=True, snapshot_full=True, fork=True,
            pause=True, limits=("memory", "pids", "output"),
            isolation="QEMU pc guest with its own kernel and disk (KVM when it works, else "
                      "TCG), no network device, commands as an unprivileged guest user",
            notes="memory_mb is the guest RAM; the root disk is a 256 MiB ext4 image and "
                  "disk_mb is not applied")

    @classmethod
    def probe(cls) -> ProbeResult:
        from dsv4.sandbox.backends.qemu_probe import probe_qemu_layer
        return probe_qemu_layer(cls.layer)

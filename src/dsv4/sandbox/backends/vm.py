"""Full VM layer: QEMU's ``pc`` machine (BIOS, PCI) with an ext4 root on a qcow2 overlay.

Each VM writes to its own qcow2 overlay on a cached base disk. The initramfs loads the virtio
block drivers and switches to the disk root. Snapshot ``fs`` is a copy of the overlay after a
guest ``sync``; snapshot ``full`` adds the memory and device state (QMP ``migrate`` to file).
"""

from __future__ import annotations

from dsv4.sandbox.backends.qemu_backend import QemuBackend


class VMBackend(QemuBackend):
    layer = "vm"
    machine_type = "pc"
    uses_disk = True
    notes = ("bash sessions run busybox sh and end when any command hits its deadline; "
             "memory_mb is the guest RAM; disk_mb is the size of the ext4 root disk; "
             "no cpu quota beyond the vCPU count")

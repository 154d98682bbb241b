"""microVM layer: QEMU's ``microvm`` machine booting the guest kernel and initramfs.

KVM is used when a boot probe shows it works, else TCG (software emulation). The guest's
root is the initramfs in guest memory, so snapshots are ``full`` only: QMP ``migrate`` of the
memory and device state to a file. Sandboxes start by restoring a cached template.
"""

from __future__ import annotations

from dsv4.sandbox.backends.qemu_backend import QemuBackend


class MicroVMBackend(QemuBackend):
    layer = "microvm"
    machine_type = "microvm"
    uses_disk = False
    notes = ("bash sessions run busybox sh and end when any command hits its deadline; "
             "memory_mb is the guest RAM and files live in it; no cpu quota beyond the vCPU "
             "count; disk_mb is not applied; no Firecracker engine")

"""Host checks of the microVM and VM layers, with the fix for each missing piece."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from dsv4.sandbox.backends.base import ProbeResult
from dsv4.sandbox.backends.qemu import QEMU_BINARY
from dsv4.sandbox.guest.image import BUSYBOX_CANDIDATES, cache_dir


def probe_qemu_layer(layer: str) -> ProbeResult:
    """Check QEMU, busybox-static, the guest kernel and the accelerator without booting."""
    reasons: list[str] = []
    details: list[str] = []
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        reasons.append(f"{QEMU_BINARY} not found; install it with 'apt-get install qemu-system-x86'")
    else:
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
        details.append(version.split("\n")[0])
    if not any(os.path.isfile(path) for path in BUSYBOX_CANDIDATES):
        reasons.append("busybox not found; install it with 'apt-get install busybox-static'")
    kernel = cache_dir() / "kernel"
    if (kernel / "release").is_file():
        details.append(f"guest kernel {(kernel / 'release').read_text().strip()} in {kernel}")
    elif shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        reasons.append(f"no guest kernel in {kernel} and no apt-get/dpkg-deb to fetch one; "
                       f"copy a Debian cloud kernel there with scripts/fetch-guest-kernel")
    else:
        details.append("guest kernel is fetched on first use (scripts/fetch-guest-kernel)")
    if layer == "vm":
        for tool, package in (("mke2fs", "e2fsprogs"), ("qemu-img", "qemu-utils")):
            if shutil.which(tool) is None:
                reasons.append(f"{tool} not found; install it with 'apt-get install {package}'")
    details.append(_accelerator_detail())
    return ProbeResult(layer=layer, available=not reasons, reasons=tuple(reasons),
                       details=tuple(details))


def _accelerator_detail() -> str:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "accelerator: TCG (software emulation), /dev/kvm is not usable"
    record = cache_dir() / "kvm-probe.json"
    if record.is_file():
        cached = json.loads(record.read_text())
        if cached.get("works"):
            return "accelerator: KVM (a boot probe succeeded)"
        return f"accelerator: TCG, because a KVM boot probe failed: {cached.get('reason', '')[:200]}"
    return "accelerator: KVM if a boot probe on first use succeeds, else TCG"

"""Build and cache the guest images that the microVM and VM layers boot.

The guest is the Debian cloud kernel (fetched by ``scripts/fetch-guest-kernel``) plus an
initramfs made here from busybox-static and the files of this package: ``init``, ``rcS``,
``inittab`` and the serial ``agent``. The VM layer also gets an ext4 disk with the same tree,
converted to qcow2, which each VM uses through its own qcow2 overlay.

Everything lands in the cache directory (``$DSV4_SANDBOX_CACHE``, else
``~/.cache/dsv4/sandbox``) under a name that hashes its inputs, so it is built once and
rebuilt only when the kernel, busybox or the guest files change.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dsv4.sandbox.errors import StartError

log = logging.getLogger(__name__)

GUEST_FILES = {
    # file in this package -> (path in the guest, mode)
    "init": ("init", 0o755),
    "rcS": ("etc/rcS", 0o755),
    "inittab": ("etc/inittab", 0o644),
    "agent": ("sbin/agent", 0o755),
}
# uid/gid 1000 runs the sandbox user's commands, so per-user limits (ulimit -u) apply to them.
PASSWD = "root:x:0:0:root:/root:/bin/sh\nsbx:x:1000:1000:sandbox:/work:/bin/sh\n"
GROUP = "root:x:0:\nsbx:x:1000:\n"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
REPO_ROOT = Path(__file__).resolve().parents[4]


def cache_dir() -> Path:
    """Return the sandbox cache directory, creating it if needed."""
    root = os.environ.get("DSV4_SANDBOX_CACHE") or str(Path.home() / ".cache" / "dsv4" / "sandbox")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock so that concurrent processes build each cache entry once."""
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class GuestImage:
    """Paths of a built guest: kernel, initramfs and (built on demand) the VM base disk."""

    kernel: Path
    initrd: Path
    digest: str          # hash of every input, names templates and disks made from this guest
    release: str         # guest kernel release, e.g. 6.1.0-57-cloud-amd64


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and _is_static_elf(path):
            return path
    raise StartError("no statically linked busybox found", layer="microvm",
                     detail=f"looked at {', '.join(BUSYBOX_CANDIDATES)}; "
                            f"install it with 'apt-get install busybox-static'")


def _is_static_elf(path: Path) -> bool:
    # A dynamically linked ELF has a PT_INTERP program header naming its loader.
    data = path.read_bytes()[:4096]
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"ld-linux" not in data


def fetch_kernel() -> Path:
    """Return the kernel directory, running ``scripts/fetch-guest-kernel`` when it is empty."""
    kernel_dir = cache_dir() / "kernel"
    if (kernel_dir / "release").is_file() and (kernel_dir / "vmlinuz").is_file():
        return kernel_dir
    script = REPO_ROOT / "scripts" / "fetch-guest-kernel"
    if not script.is_file():
        raise StartError("guest kernel missing", layer="microvm",
                         detail=f"{kernel_dir} has no vmlinuz and {script} does not exist; "
                                f"run scripts/fetch-guest-kernel from a dsv4 checkout")
    with cache_lock("kernel"):
        if not (kernel_dir / "release").is_file():
            log.info("fetching the guest kernel into %s", kernel_dir)
            proc = subprocess.run([str(script), str(kernel_dir)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise StartError("fetching the guest kernel failed", layer="microvm",
                                 detail=f"{script} exited with {proc.returncode}: "
                                        f"{proc.stderr.strip()[-500:]}")
    return kernel_dir


def _guest_tree_digest(busybox: Path, kernel_dir: Path) -> str:
    digest = hashlib.sha256()
    digest.update((kernel_dir / "release").read_bytes())
    digest.update(hashlib.sha256(busybox.read_bytes()).digest())
    for name in sorted(GUEST_FILES):
        digest.update(name.encode())
        digest.update((Path(__file__).parent / name).read_bytes())
    digest.update(PASSWD.encode() + GROUP.encode())
    digest.update(Path(__file__).read_bytes())   # the layout of the image is defined here
    return digest.hexdigest()[:16]


def build_guest() -> GuestImage:
    """Return the cached guest image, building the initramfs on first use."""
    kernel_dir = fetch_kernel()
    busybox = find_busybox()
    digest = _guest_tree_digest(busybox, kernel_dir)
    out_dir = cache_dir() / f"guest-{digest}"
    initrd = out_dir / "initrd.cpio.gz"
    if not initrd.is_file():
        with cache_lock(f"guest-{digest}"):
            if not initrd.is_file():
                log.info("building the guest initramfs in %s", out_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                entries = _guest_entries(busybox, kernel_dir / "modules")
                tmp = initrd.with_suffix(".tmp")
                with gzip.open(tmp, "wb", compresslevel=6) as handle:
                    handle.write(newc_archive(entries))
                tmp.rename(initrd)
                prune_cache(digest)
    touch_entry(out_dir)
    release = (kernel_dir / "release").read_text().strip()
    return GuestImage(kernel=kernel_dir / "vmlinuz", initrd=initrd, digest=digest, release=release)


# One entry: (path without leading slash, mode including the file type bits, content or
# symlink target, device number for character devices).
Entry = tuple[str, int, bytes, int]


def _guest_entries(busybox: Path, modules_dir: Path) -> list[Entry]:
    entries: list[Entry] = []
    for directory in ("bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "work",
                      "root", "newroot", "lib", "lib/modules", "usr", "usr/bin", "usr/sbin"):
        mode = 0o1777 if directory == "tmp" else 0o755
        entries.append((directory, stat.S_IFDIR | mode, b"", 0))
    # /dev/console must exist before devtmpfs is mounted, because the kernel opens it for init.
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), 0))
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet not in ("bin/busybox", "sbin/init"):
            entries.append((applet, stat.S_IFLNK | 0o777, b"/bin/busybox", 0))
    entries.append(("sbin/init", stat.S_IFLNK | 0o777, b"/bin/busybox", 0))
    for name, (guest_path, mode) in GUEST_FILES.items():
        entries.append((guest_path, stat.S_IFREG | mode, (Path(__file__).parent / name).read_bytes(), 0))
    entries.append(("etc/passwd", stat.S_IFREG | 0o644, PASSWD.encode(), 0))
    entries.append(("etc/group", stat.S_IFREG | 0o644, GROUP.encode(), 0))
    for module in sorted(modules_dir.glob("*.ko")):
        entries.append((f"lib/modules/{module.name}", stat.S_IFREG | 0o644, module.read_bytes(), 0))
    return entries


def newc_archive(entries: list[Entry]) -> bytes:
    """Return a cpio archive in the "newc" format that the kernel unpacks as initramfs."""
    parts: list[bytes] = []
    for inode, (name, mode, data, rdev) in enumerate(entries + [("TRAILER!!!", 0, b"", 0)], 1):
        name_bytes = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0, len(data), 0, 0,
                  os.major(rdev), os.minor(rdev), len(name_bytes), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        parts.append(header + name_bytes)
        parts.append(b"\0" * (-(len(header) + len(name_bytes)) % 4))
        parts.append(data)
        parts.append(b"\0" * (-len(data) % 4))
    return b"".join(parts)


def build_base_disk(guest: GuestImage, size_mb: int = 256) -> Path:
    """Return the cached qcow2 base disk of the VM layer (an ext4 root with the guest tree)."""
    out = cache_dir() / f"disk-{guest.digest}-{size_mb}" / "base.qcow2"
    if out.is_file():
        touch_entry(out.parent)
        return out
    with cache_lock(f"disk-{guest.digest}-{size_mb}"):
        if out.is_file():
            return out
        for tool in ("mke2fs", "qemu-img"):
            if shutil.which(tool) is None:
                raise StartError(f"{tool} not found", layer="vm",
                                 detail="install e2fsprogs and qemu-utils")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="dsv4-disk-") as tmp:
            tree = Path(tmp) / "tree"
            _write_tree(tree, _guest_entries(find_busybox(), fetch_kernel() / "modules"))
            raw = Path(tmp) / "disk.raw"
            subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "dsv4root", "-d", str(tree),
                            str(raw), f"{size_mb}M"], check=True, capture_output=True)
            tmp_out = out.with_suffix(".tmp")
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                            str(tmp_out)], check=True, capture_output=True)
            tmp_out.rename(out)
    return out


def prune_cache(keep_digest: str, max_idle_days: float = 7.0) -> list[Path]:
    """Remove guests, disks and templates of other guest digests unused for ``max_idle_days``.

    Every change to the guest files makes a new digest, so old entries (about 90 MiB per
    template) would pile up. Use counts as a touch of the entry's mtime (``touch_entry``).
    """
    root = cache_dir()
    cutoff = time.time() - max_idle_days * 86400
    candidates = list(root.glob("guest-*")) + list(root.glob("disk-*"))
    candidates += list((root / "templates").glob("template-*"))
    removed = []
    for path in candidates:
        if keep_digest in path.name or not path.is_dir():
            continue
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
                removed.append(path)
        except OSError as exc:
            log.warning("could not prune cache entry %s: %s", path, exc)
    for path in removed:
        log.info("pruned unused cache entry %s", path)
    return removed


def touch_entry(path: Path) -> None:
    """Mark a cache directory as used now, so ``prune_cache`` keeps it."""
    try:
        os.utime(path)
    except OSError:
        pass


def _write_tree(root: Path, entries: list[Entry]) -> None:
    for name, mode, data, _rdev in entries:
        path = root / name
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(data.decode())
        elif stat.S_ISREG(mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(stat.S_IMODE(mode))
        # Device nodes are skipped: the VM layer moves the initramfs devtmpfs onto the disk root.

"""Thin ctypes wrappers over mount(2)/umount2(2) and a reader of /proc/self/mountinfo."""

from __future__ import annotations

import ctypes
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    result = _libc.mount(source.encode() if source else None, target.encode(),
                         fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                         data.encode() if data else None)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} on {target} ({fstype or 'bind'}, {data or ''}) "
                            f"failed: {os.strerror(code)}")


def umount(target: str, detach: bool = True) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH if detach else 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target} failed: {os.strerror(code)}")


def bind_readonly(source: str, target: str) -> None:
    """Bind ``source`` on ``target`` and make the bind read-only, nosuid and nodev."""
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def mounts_under(prefix: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Return mount points at or below ``prefix``, deepest first (the order to unmount)."""
    prefix = os.path.realpath(prefix).rstrip("/")
    points = []
    with open(mountinfo) as handle:
        for line in handle:
            # Field 5 is the mount point; octal escapes (\040 for space) are decoded.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: -p.count("/"))


def unmount_all_under(prefix: str) -> list[str]:
    """Detach every mount at or below ``prefix``; return the mount points detached."""
    done = []
    for point in mounts_under(prefix):
        try:
            umount(point)
            done.append(point)
        except OSError:
            pass             # already gone through a parent's detach
    return done

"""File plane over a sandbox root directory that the host can see.

Sandboxed code controls the contents of its root, including symlinks such as
``/work/x -> /etc/shadow``. Every path is therefore opened with ``openat2`` and
``RESOLVE_IN_ROOT`` (Linux 5.6+), which resolves ``..`` and absolute symlinks against the
sandbox root instead of the host root. Files the host creates are chowned to the sandbox user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from dsv4.sandbox.errors import InvalidSpec, ResourceExhausted, SandboxFileNotFound
from dsv4.sandbox.types import FileInfo

_SYS_OPENAT2 = 437                      # x86_64 and aarch64 share this number
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0o644) -> int:
    """Open ``path`` (absolute inside the sandbox) relative to ``root_fd``; return an fd."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            raise SandboxFileNotFound(f"{path} does not exist in the sandbox")
        raise OSError(code, f"{os.strerror(code)}: {path} (inside the sandbox)")
    return fd


def _split(path: str) -> tuple[str, str]:
    if not path.startswith("/"):
        raise InvalidSpec(f"path={path!r} must be absolute inside the sandbox")
    parent, name = os.path.split(os.path.normpath(path))
    if not name or name in (".", ".."):
        raise InvalidSpec(f"path={path!r} names no file")
    return parent, name


class RootFiles:
    """Read, write, list and remove files under one sandbox root directory."""

    def __init__(self, root: str, owner: tuple[int, int] = (0, 0)) -> None:
        self.root = root
        self.owner = owner

    def _open_root(self) -> int:
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open(self, path: str, flags: int, mode: int = 0o644) -> int:
        root_fd = self._open_root()
        try:
            return open_in_root(root_fd, path, flags, mode)
        finally:
            os.close(root_fd)

    def _make_dirs(self, path: str) -> int:
        """Create every missing directory of ``path``; return an fd of the last one."""
        root_fd = self._open_root()
        try:
            fd = open_in_root(root_fd, "/", os.O_RDONLY | os.O_DIRECTORY)
            prefix = ""
            for part in [p for p in os.path.normpath(path).split("/") if p]:
                prefix += "/" + part
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, *self.owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                os.close(fd)
                # Each prefix is resolved from the sandbox root, so a symlinked directory
                # resolves the way the sandbox itself would see it.
                fd = open_in_root(root_fd, prefix, os.O_RDONLY | os.O_DIRECTORY)
            return fd
        finally:
            os.close(root_fd)

    def read(self, path: str) -> bytes:
        fd = self._open(path, os.O_RDONLY)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise IsADirectoryError(errno.EISDIR, f"{path} is a directory in the sandbox")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        parent, name = _split(path)
        dir_fd = self._make_dirs(parent)
        try:
            fd = open_in_root(dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        finally:
            os.close(dir_fd)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchown(fd, *self.owner)
            os.fchmod(fd, mode)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"writing {len(data)} bytes to {path} failed: the sandbox disk is full; "
                    f"create the sandbox with a larger disk_mb", resource="disk") from error
            raise
        finally:
            os.close(fd)

    def list(self, path: str) -> list[FileInfo]:
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            entries = []
            for name in sorted(os.listdir(fd)):
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    kind = "file"
                elif stat.S_ISDIR(info.st_mode):
                    kind = "dir"
                elif stat.S_ISLNK(info.st_mode):
                    kind = "symlink"
                else:
                    kind = "other"
                entries.append(FileInfo(name, os.path.join(path, name), kind, info.st_size,
                                        stat.S_IMODE(info.st_mode)))
            return entries
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        parent, name = _split(path)
        dir_fd = self._open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _remove_entry(dir_fd, name, path)
        finally:
            os.close(dir_fd)


def _remove_entry(dir_fd: int, name: str, display_path: str) -> None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise SandboxFileNotFound(f"{display_path} does not exist in the sandbox") from None
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # O_NOFOLLOW keeps a symlink swapped in after the stat from redirecting the walk.
    child_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for child in os.listdir(child_fd):
            _remove_entry(child_fd, child, f"{display_path}/{child}")
    finally:
        os.close(child_fd)
    os.rmdir(name, dir_fd=dir_fd)

"""Root filesystem images for the function and container layers.

``image="host"`` is a minimal root built on the fly: empty mount points for ``/usr``,
``/proc`` and ``/dev``, the usual merged-/usr symlinks (``/bin -> usr/bin``), a small ``/etc``,
and writable ``/tmp``, ``/work`` and ``/run/sbx/journal``. The layer then bind-mounts the host's
``/usr`` read-only on top, so tools and interpreters are the host's but no other host path is
visible. ``image="dir:/a:/b"`` stacks host directories as read-only overlay layers (the first
is the top layer) above that same minimal root.

A layer may also be an erofs or squashfs image file (``.erofs``, ``.sqfs``, ``.squashfs``),
which the container layer loop-mounts read-only under the sandbox's own directory.

NOTE: files of layers keep their owners. The container layer's root maps to an unprivileged
host uid, so it can change such files only where their mode allows it.
"""

from __future__ import annotations

import os

from dsv4.sandbox.errors import InvalidSpec
from dsv4.sandbox.types import JOURNAL_DIR

# Host paths bound read-only into every "host" image root.
HOST_READONLY = ("/usr",)
USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
IMAGE_FILE_SUFFIXES = (".erofs", ".sqfs", ".squashfs")


def parse_image(image: str) -> list[str]:
    """Return the extra lower layers (host directories, top first) named by ``image``."""
    if image == "host":
        return []
    if image.startswith("dir:"):
        layers = [p for p in image[4:].split(":") if p]
        for layer in layers:
            if not (os.path.isdir(layer) or (os.path.isfile(layer)
                                             and layer.endswith(IMAGE_FILE_SUFFIXES))):
                raise InvalidSpec(f"image layer {layer!r} is neither a directory nor an image "
                                  f"file ({', '.join(IMAGE_FILE_SUFFIXES)}); "
                                  f"image='dir:/path[:/path...]' takes host paths")
        return layers
    raise InvalidSpec(f"image={image!r} is not supported; use 'host' or 'dir:/path[:/path...]'")


def build_minimal_root(root: str, uid: int, gid: int, workdir: str) -> None:
    """Populate ``root`` with the skeleton of the ``host`` image; files belong to uid:gid."""
    for name, target in USR_LINKS.items():
        if os.path.exists(os.path.join("/", target)) and not os.path.lexists(
                os.path.join(root, name)):
            os.symlink(target, os.path.join(root, name))
    for directory in ("usr", "proc", "dev", "etc", "root", "run", "var/tmp", JOURNAL_DIR[1:]):
        os.makedirs(os.path.join(root, directory), exist_ok=True)
    for directory in ("tmp", "var/tmp"):
        path = os.path.join(root, directory)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o1777)
    for device in DEVICES:
        open(os.path.join(root, "dev", device), "a").close()
    work = os.path.join(root, workdir.lstrip("/"))
    os.makedirs(work, exist_ok=True)
    for path in (work, os.path.join(root, "root"), os.path.join(root, "run")):
        os.chown(path, uid, gid)
    etc = os.path.join(root, "etc")
    _write(os.path.join(etc, "passwd"),
           f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{gid}:sandbox:{workdir}:/bin/sh\n"
           f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    _write(os.path.join(etc, "group"), f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n")
    _write(os.path.join(etc, "hosts"), "127.0.0.1 localhost\n::1 localhost\n")
    _write(os.path.join(etc, "nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files\n")
    if os.path.exists("/etc/ld.so.cache"):
        with open("/etc/ld.so.cache", "rb") as src:
            _write(os.path.join(etc, "ld.so.cache"), src.read())


def _write(path: str, data: str | bytes) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as handle:
        handle.write(data)

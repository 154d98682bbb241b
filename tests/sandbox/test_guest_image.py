"""Host-side pieces of the VM layers that need no QEMU: cpio writer, cache pruning, scripts."""

from __future__ import annotations

import os
import stat
import subprocess
import time

from dsv4.sandbox.backends.qemu_agent import command_script
from dsv4.sandbox.guest.image import newc_archive, prune_cache


def parse_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Return (name, mode, content) of each member of a newc cpio archive."""
    members = []
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701", f"bad magic at offset {offset}"
        fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        content = data[data_start:data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return members
        members.append((name, mode, content))


def test_newc_archive_roundtrip():
    entries = [("bin", stat.S_IFDIR | 0o755, b"", 0),
               ("bin/tool", stat.S_IFREG | 0o755, b"odd-length", 0),
               ("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox", 0),
               ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1))]
    members = parse_newc(newc_archive(entries))
    assert [name for name, _, _ in members] == ["bin", "bin/tool", "bin/sh", "dev/console"]
    assert members[1][2] == b"odd-length"
    assert members[2][2] == b"/bin/busybox"
    assert stat.S_ISCHR(members[3][1])


def test_prune_cache_keeps_current_and_recent(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_SANDBOX_CACHE", str(tmp_path))
    (tmp_path / "templates").mkdir()
    current = tmp_path / "templates" / "template-microvm-aaaa-m160"
    stale = tmp_path / "templates" / "template-microvm-bbbb-m160"
    recent = tmp_path / "guest-cccc"
    old_guest = tmp_path / "guest-bbbb"
    kernel = tmp_path / "kernel"
    for path in (current, stale, recent, old_guest, kernel):
        path.mkdir()
    long_ago = time.time() - 30 * 86400
    for path in (current, stale, old_guest, kernel):
        os.utime(path, (long_ago, long_ago))

    removed = prune_cache("aaaa", max_idle_days=7)

    assert sorted(removed) == sorted([stale, old_guest])
    assert current.is_dir()
    assert recent.is_dir()
    assert kernel.is_dir()


def test_command_script_quotes_for_sh(tmp_path):
    # busybox sh is the guest's shell (dash has no "ulimit -u").
    script = command_script(["printf", "%s|", "a b", "it's", "$HOME"], cwd=str(tmp_path),
                            env={"VALUE": "x y'z"}, max_processes=50)
    probe = command_script(["sh", "-c", 'printf "%s|%s" "$VALUE" "$(ulimit -u)"'],
                           cwd=str(tmp_path), env={"VALUE": "x y'z"}, max_processes=50)
    output = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True, check=True)
    assert output.stdout == "a b|it's|$HOME|"
    probed = subprocess.run(["busybox", "sh", "-c", probe], capture_output=True, text=True, check=True)
    assert probed.stdout == "x y'z|50"

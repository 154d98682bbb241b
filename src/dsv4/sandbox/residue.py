"""Find what a sandbox left on the host: processes, mounts, cgroups and files named after it.

Used by the tests after every kill and by ``dsv4 sandbox probe --residue``. It relies on the
naming rule that every host resource of a sandbox carries its id.
"""

from __future__ import annotations

import os

from dsv4.sandbox import cgroups

SNAPSHOT_DIR = "snapshots"      # snapshots outlive their source sandbox on purpose


def _processes_with(token: str) -> list[str]:
    found = []
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        for name in ("cmdline", "cgroup"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as handle:
                    data = handle.read()
            except OSError:
                break
            if token.encode() in data:
                shown = data.replace(b"\0", b" ")[:120]
                found.append(f"process {entry}: {shown!r}")
                break
    return found


def _mounts_with(token: str) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [f"mount {line.split()[4]}" for line in handle if token in line]


def _cgroups_with(token: str) -> list[str]:
    found = []
    try:
        layout = cgroups.detect_layout()
    except Exception:  # noqa: BLE001 - no cgroups means no cgroup residue
        return found
    for parent in layout.parents():
        path = os.path.join(parent, cgroups.NAME_PREFIX + token)
        if os.path.exists(path):
            found.append(f"cgroup {path}")
    return found


def _files_with(token: str, state_dir: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(state_dir):
        if os.path.relpath(dirpath, state_dir) == ".":
            dirnames[:] = [d for d in dirnames if d != SNAPSHOT_DIR]
        for name in (*dirnames, *filenames):
            if token in name:
                found.append(f"file {os.path.join(dirpath, name)}")
    return found


def find_residue(sandbox_id: str, state_dir: str) -> list[str]:
    """Return one line per host resource that still carries ``sandbox_id``; empty when clean."""
    return (_processes_with(sandbox_id) + _mounts_with(sandbox_id) + _cgroups_with(sandbox_id)
            + _files_with(sandbox_id, state_dir))

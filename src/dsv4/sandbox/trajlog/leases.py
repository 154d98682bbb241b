"""Writer epochs: which worker may append to a trajectory.

Taking epoch n creates the file `epoch-<n>` with O_EXCL in the trajectory's lease
directory, a compare-and-swap that works on local disks and on shared POSIX file
systems. A writer whose epoch is no longer the newest is stale: it must stop, and
readers ignore what it appended after the newer writer read the log.
"""

from __future__ import annotations

import os
from pathlib import Path

from .segment import fsync_dir

_PREFIX = "epoch-"


def _lease_dir(root: Path, run_id: str, traj_id: str) -> Path:
    return Path(root) / run_id / traj_id


def current_epoch(root: Path, run_id: str, traj_id: str) -> int:
    """Return the newest epoch taken for the trajectory (0 when none was taken)."""
    directory = _lease_dir(root, run_id, traj_id)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    epochs = [int(name[len(_PREFIX):]) for name in names if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit()]
    return max(epochs, default=0)


def take_epoch(root: Path, run_id: str, traj_id: str, owner: str) -> int:
    """Take the next epoch for the trajectory and return it; retries when another writer races."""
    directory = _lease_dir(root, run_id, traj_id)
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        epoch = current_epoch(root, run_id, traj_id) + 1
        path = directory / f"{_PREFIX}{epoch:09d}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        try:
            os.write(fd, owner.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        return epoch


def is_stale(root: Path, run_id: str, traj_id: str, epoch: int) -> bool:
    """Return True when a newer epoch than `epoch` was taken (one stat call)."""
    return (_lease_dir(root, run_id, traj_id) / f"{_PREFIX}{epoch + 1:09d}").exists()

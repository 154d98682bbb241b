"""Errors of the trajectory log that the shared sandbox error module does not define."""

from __future__ import annotations

from dsv4.sandbox.errors import SandboxError


class StaleWriter(SandboxError):
    """Another worker took a newer epoch of the trajectory; this writer must stop."""

    def __init__(self, run_id: str, traj_id: str, epoch: int) -> None:
        super().__init__(f"trajectory {run_id}/{traj_id}: writer epoch {epoch} was fenced by a newer "
                         "epoch; another worker resumed it, so stop this worker and drop its state")
        self.run_id = run_id
        self.traj_id = traj_id
        self.epoch = epoch


class Unrecoverable(SandboxError):
    """The sandbox state a resumed trajectory needs can be neither reattached nor rebuilt."""

    def __init__(self, run_id: str, traj_id: str, reason: str) -> None:
        super().__init__(f"trajectory {run_id}/{traj_id} cannot continue live: {reason}; "
                         "drop or regenerate the trajectory, or take snapshots more often")
        self.run_id = run_id
        self.traj_id = traj_id
        self.reason = reason

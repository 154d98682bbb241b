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


class JournalUnavailable(SandboxError):
    """The replay wrapper could not create its journal directory, so it ran nothing."""

    def __init__(self, sandbox_id: str, journal_dir: str) -> None:
        super().__init__(f"sandbox {sandbox_id}: the sandbox user cannot create the replay journal "
                         f"directory {journal_dir}; pass a journal_dir that the sandbox user can write "
                         "and that lives as long as the sandbox")
        self.sandbox_id = sandbox_id
        self.journal_dir = journal_dir

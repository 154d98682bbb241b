"""Garbage collection of consumed trajectories.

A trajectory is collectable once a CONSUMED record was logged for it. A segment is
deleted when every trajectory with records in it is collectable; blobs are then
mark-and-swept against the RESULT records that remain. A blob younger than
`grace_s` is kept even when unreferenced, because its RESULT may not be written yet.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from .framing import RecordType
from .segment import INDEX_SUFFIX, read_segment
from .store import TrajectoryLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    segments_deleted: int
    blobs_deleted: int
    trajectories_collected: int


def _blob_refs(payload: dict) -> list[str]:
    return [payload[name]["blob"] for name in ("stdout", "stderr") if "blob" in payload.get(name, {})]


def collect_garbage(log: TrajectoryLog, *, grace_s: float = 3600.0) -> GcReport:
    """Delete the segments, blobs and leases of consumed trajectories; never the open segment."""
    if log._writer is not None:
        log._writer.flush()
    segments = [(path, read_segment(path)[0]) for path in log.segment_paths()]
    consumed = {(str(f.payload.get("run")), str(f.payload.get("traj")))
                for _, frames in segments for f in frames if f.rtype == RecordType.CONSUMED}
    # A fork reads its parent's calls before the fork step, so a parent stays while a fork of it is live.
    for _, frames in segments:
        for frame in frames:
            parent = frame.payload.get("parent") if frame.rtype == RecordType.TRAJ_BEGIN else None
            child = (str(frame.payload.get("run")), str(frame.payload.get("traj")))
            if parent and child not in consumed:
                consumed.discard((parent["run"], parent["traj"]))
    open_segment = log._writer.path if log._writer is not None else None

    segments_deleted = 0
    live_blobs: set[str] = set()
    for path, frames in segments:
        keys = {(str(f.payload.get("run")), str(f.payload.get("traj"))) for f in frames}
        if path != open_segment and keys <= consumed:
            path.unlink()
            path.with_suffix(INDEX_SUFFIX).unlink(missing_ok=True)
            segments_deleted += 1
            continue
        for frame in frames:
            if frame.rtype == RecordType.RESULT:
                live_blobs.update(_blob_refs(frame.payload))

    now = time.time()
    blobs_deleted = 0
    for digest in log.blobs.digests() - live_blobs:
        path = log.blobs.path_for(digest)
        if now - path.stat().st_mtime >= grace_s:
            log.blobs.delete(digest)
            blobs_deleted += 1

    for run_id, traj_id in consumed:
        shutil.rmtree(log.leases_dir / run_id / traj_id, ignore_errors=True)
    logger.info("log gc under %s: %d trajectories collected, %d segments and %d blobs deleted", log.root,
                len(consumed), segments_deleted, blobs_deleted)
    return GcReport(segments_deleted, blobs_deleted, len(consumed))

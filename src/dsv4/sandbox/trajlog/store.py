"""The trajectory log on disk: segments, blobs and writer epochs under one root.

Layout under `root` (a shared file system lets any worker resume any trajectory):

    segments/<writer_id>-<n>.seg   framed records; <n>.idx is the sparse index of a closed segment
    blobs/<ab>/<sha256>            large outputs, content-addressed
    leases/<run>/<traj>/epoch-<n>  writer epochs taken with O_EXCL
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

from .blobs import BlobStore
from .framing import Frame, RecordType, iter_frames
from .segment import SEGMENT_SUFFIX, SegmentWriter, read_sparse_index, read_segment
from .state import TrajectoryState, fold

logger = logging.getLogger(__name__)


def trajectory_name(run_id: str, traj_id: str) -> str:
    return f"{run_id}/{traj_id}"


def check_id(name: str, value: str) -> None:
    if not value or "/" in value or value in (".", "..") or "\x00" in value:
        raise ValueError(f"{name}={value!r} is not a valid id: use a non-empty name without '/' or NUL")


class TrajectoryLog:
    """Opens the log under `root`; one instance per worker process.

    group_records / group_ms / segment_bytes are passed to this worker's SegmentWriter.
    """

    def __init__(self, root: str | os.PathLike[str], *, writer_id: str | None = None,
                 group_records: int = 32, group_ms: float = 5.0, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.segments_dir = self.root / "segments"
        self.leases_dir = self.root / "leases"
        self.blobs = BlobStore(self.root / "blobs")
        self.writer_id = writer_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._writer_options = dict(group_records=group_records, group_ms=group_ms, segment_bytes=segment_bytes)
        self._writer: SegmentWriter | None = None

    @property
    def writer(self) -> SegmentWriter:
        if self._writer is None:
            self._writer = SegmentWriter(self.segments_dir, self.writer_id, **self._writer_options)
        return self._writer

    def segment_paths(self) -> list[Path]:
        if not self.segments_dir.exists():
            return []
        return sorted(self.segments_dir.glob(f"*{SEGMENT_SUFFIX}"))

    def frames_for(self, run_id: str, traj_id: str) -> list[Frame]:
        """Return the readable frames of one trajectory from every segment.

        Closed segments with a matching sparse index are read only at the listed offsets;
        the others are scanned up to their first bad record.
        """
        # NOTE: a killed worker never closes its segment, so its segment gets no sparse index
        # and every later load scans it whole.
        name = trajectory_name(run_id, traj_id)
        if self._writer is not None:
            self._writer.flush()
        found: list[Frame] = []
        for path in self.segment_paths():
            offsets = read_sparse_index(path)
            if offsets is not None:
                traj_offsets = offsets.get(name)
                if not traj_offsets:
                    continue
                data = path.read_bytes()
                for offset in traj_offsets:
                    frame = next(iter_frames(data, offset), None)
                    if frame is not None and _belongs(frame, run_id, traj_id):
                        found.append(frame)
                continue
            frames, _, _ = read_segment(path)
            found.extend(f for f in frames if _belongs(f, run_id, traj_id))
        return found

    def scan_all(self) -> dict[tuple[str, str], list[Frame]]:
        """Scan every segment and group its readable frames by (run_id, traj_id)."""
        if self._writer is not None:
            self._writer.flush()
        grouped: dict[tuple[str, str], list[Frame]] = {}
        for path in self.segment_paths():
            frames, _, _ = read_segment(path)
            for frame in frames:
                key = (str(frame.payload.get("run")), str(frame.payload.get("traj")))
                grouped.setdefault(key, []).append(frame)
        return grouped

    def load(self, run_id: str, traj_id: str) -> TrajectoryState:
        """Fold one trajectory (and the parent it was forked from, if any) into its state."""
        frames = self.frames_for(run_id, traj_id)
        parent = None
        begin = next((f for f in frames if f.rtype == RecordType.TRAJ_BEGIN and f.payload.get("parent")), None)
        if begin is not None:
            ref = begin.payload["parent"]
            parent = self.load(ref["run"], ref["traj"])
        return fold(run_id, traj_id, frames, parent)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _belongs(frame: Frame, run_id: str, traj_id: str) -> bool:
    return frame.payload.get("run") == run_id and frame.payload.get("traj") == traj_id

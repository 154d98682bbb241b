"""Append-only segment files with group commit.

Each writer owns its segment files, so appends need no cross-process locking. Records
are buffered in memory and written with one `os.write` per group; `sync` also calls
`fdatasync`. A durable append (the INTENT before a non-idempotent call) writes and syncs
everything buffered before it, so its earlier RESULT records become durable too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .framing import RecordType, encode_frame, scan_frames

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
INDEX_SUFFIX = ".idx"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """Appends framed records to numbered segment files `<writer_id>-<n>.seg` in `directory`.

    group_records / group_ms: a buffered record is written and fdatasync'd once this many
    records are pending or this many milliseconds passed since the last sync. Both are
    checked on append (there is no timer), so call `sync` or `close` when a run pauses.
    segment_bytes: a segment at or above this size is closed (its sparse index written)
    and the next append opens a new one.
    """

    def __init__(self, directory: Path, writer_id: str, *, group_records: int = 32,
                 group_ms: float = 5.0, segment_bytes: int = 64 * 1024 * 1024) -> None:
        if group_records < 1:
            raise ValueError(f"group_records={group_records} must be >= 1")
        self.directory = Path(directory)
        self.writer_id = writer_id
        self.group_records = group_records
        self.group_ms = group_ms
        self.segment_bytes = segment_bytes
        self._number = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # bytes written to the current segment, buffered bytes excluded
        self._buffer = bytearray()
        self._pending = 0
        self._last_sync = time.monotonic()
        # Offsets of each trajectory's records in the current segment, for its sparse index.
        self._offsets: dict[str, list[int]] = {}

    @property
    def path(self) -> Path | None:
        return self._path

    def _open_next(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            self._number += 1
            path = self.directory / f"{self.writer_id}-{self._number:06d}{SEGMENT_SUFFIX}"
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                continue
            break
        self._path = path
        self._size = 0
        self._offsets = {}
        fsync_dir(self.directory)
        logger.debug("opened log segment %s", path)

    def append(self, rtype: RecordType, payload: dict[str, Any], *, durable: bool = False) -> None:
        """Buffer one record; with durable=True, write and fdatasync it before returning."""
        if self._fd is None:
            self._open_next()
        frame = encode_frame(rtype, payload)
        traj = f"{payload.get('run')}/{payload.get('traj')}"
        self._offsets.setdefault(traj, []).append(self._size + len(self._buffer))
        self._buffer += frame
        self._pending += 1
        if durable:
            self.sync()
        elif (self._pending >= self.group_records
              or (time.monotonic() - self._last_sync) * 1000.0 >= self.group_ms):
            self.sync()

    def flush(self) -> None:
        """Write buffered records to the file without syncing (they survive a process kill)."""
        if not self._buffer or self._fd is None:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        self._size += len(data)

    def sync(self) -> None:
        """Write buffered records and fdatasync the segment."""
        self.flush()
        if self._fd is not None:
            os.fdatasync(self._fd)
        self._pending = 0
        self._last_sync = time.monotonic()
        if self._fd is not None and self._size >= self.segment_bytes:
            self._close_segment()

    def _close_segment(self) -> None:
        assert self._fd is not None and self._path is not None, "no open segment to close"
        os.close(self._fd)
        write_sparse_index(self._path, self._size, self._offsets)
        self._fd = None

    def close(self) -> None:
        self.sync()
        if self._fd is not None:
            self._close_segment()


def write_sparse_index(segment: Path, size: int, offsets: dict[str, list[int]]) -> None:
    """Write `<segment>.idx`: the segment size and the record offsets of each trajectory."""
    tmp = segment.with_suffix(INDEX_SUFFIX + ".tmp")
    tmp.write_text(json.dumps({"size": size, "trajs": offsets}, separators=(",", ":")))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, segment.with_suffix(INDEX_SUFFIX))


def read_sparse_index(segment: Path) -> dict[str, list[int]] | None:
    """Return the trajectory offsets of a closed segment, or None when no index matches it."""
    path = segment.with_suffix(INDEX_SUFFIX)
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("size") != segment.stat().st_size:
        # A segment that grew or shrank after its index was written is scanned instead.
        return None
    return index.get("trajs")


def read_segment(segment: Path) -> tuple[list, int, int]:
    """Scan a whole segment; return (frames, valid length, file length)."""
    data = segment.read_bytes()
    frames, valid = scan_frames(data)
    if valid != len(data):
        logger.info("log segment %s: %d-byte torn tail after offset %d ignored", segment, len(data) - valid, valid)
    return frames, valid, len(data)

"""Record framing for log segments.

A frame is a 12-byte header followed by a JSON payload:

    magic "TJ" (2 bytes) | version (1) | record type (1) | payload length (u32, LE) | CRC32 (u32, LE)

The CRC covers the version, type and length bytes and the payload, so a flipped bit in
the header is caught as well as one in the payload. Readers stop at the first frame that
is short or fails a check: everything after it is a torn tail.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

MAGIC = b"TJ"
VERSION = 1
HEADER = struct.Struct("<2sBBII")  # magic, version, type, length, crc32
HEADER_SIZE = HEADER.size  # 12 bytes
# A payload larger than this is treated as corruption: big outputs go to the blob store.
MAX_PAYLOAD = 16 * 1024 * 1024


class RecordType(enum.IntEnum):
    TRAJ_BEGIN = 1
    INTENT = 2
    RESULT = 3
    MODEL = 4
    SNAPSHOT = 5
    REWARD = 6
    RESUME = 7
    ABORT = 8
    TRAJ_END = 9
    CONSUMED = 10
    SANDBOX = 11  # the trajectory's calls run in this sandbox from now on


_RECORD_TYPES = {int(t): t for t in RecordType}
_DECODER = json.JSONDecoder()


def encode_frame(rtype: RecordType, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"{rtype.name} payload is {len(body)} bytes, above the {MAX_PAYLOAD}-byte frame limit; "
                         "store large outputs in the blob store and log their digest")
    head = struct.pack("<BBI", VERSION, int(rtype), len(body))
    crc = zlib.crc32(body, zlib.crc32(head))
    return HEADER.pack(MAGIC, VERSION, int(rtype), len(body), crc) + body


@dataclass(slots=True)
class Frame:
    rtype: RecordType
    payload: dict[str, Any]
    offset: int  # byte offset of the header in its segment
    end: int  # byte offset just past the payload


def _frame_at(data: bytes | memoryview, offset: int) -> Frame | None:
    if len(data) - offset < HEADER_SIZE:
        return None
    magic, version, rtype, length, crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC or version != VERSION or length > MAX_PAYLOAD:
        return None
    end = offset + HEADER_SIZE + length
    if end > len(data):
        return None
    body = bytes(data[offset + HEADER_SIZE:end])
    # Bytes 2..8 of the header are the version, type and length fields the CRC covers.
    if zlib.crc32(body, zlib.crc32(data[offset + 2:offset + 8])) != crc:
        return None
    kind = _RECORD_TYPES.get(rtype)
    if kind is None:
        return None
    try:
        # The C scanner without json.loads' encoding detection and whitespace skipping,
        # which cost about a third of the scan time; encode_frame writes no whitespace.
        text = body.decode()
        payload, stop = _DECODER.scan_once(text, 0)
    except (ValueError, StopIteration):
        return None
    if stop != len(text):
        return None
    if not isinstance(payload, dict):
        return None
    return Frame(kind, payload, offset, end)


def scan_frames(data: bytes | memoryview, start: int = 0) -> tuple[list[Frame], int]:
    """Decode frames from `start` until the first bad one.

    Returns the frames and the offset where the valid prefix ends; bytes past that
    offset are a torn or corrupt tail.
    """
    frames: list[Frame] = []
    offset = start
    while True:
        frame = _frame_at(data, offset)
        if frame is None:
            return frames, offset
        frames.append(frame)
        offset = frame.end


def iter_frames(data: bytes | memoryview, start: int = 0) -> Iterator[Frame]:
    offset = start
    while (frame := _frame_at(data, offset)) is not None:
        yield frame
        offset = frame.end

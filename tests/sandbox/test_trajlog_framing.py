"""Framing, torn tails, canonical hashing, segments, sparse indexes, blobs and epochs."""

from __future__ import annotations

import os
import threading

import pytest

from dsv4.sandbox.trajlog import leases
from dsv4.sandbox.trajlog.blobs import BlobStore
from dsv4.sandbox.trajlog.framing import HEADER_SIZE, RecordType, encode_frame, scan_frames
from dsv4.sandbox.trajlog.hashing import (ToolRequest, ToolResult, canonical_json, idem_key, request_hash,
                                          result_hash)
from dsv4.sandbox.trajlog.segment import SegmentWriter, read_segment, read_sparse_index


def _records(count: int) -> list[bytes]:
    return [encode_frame(RecordType.INTENT, {"run": "r", "traj": "t", "seq": i, "text": "é" * (i % 7)})
            for i in range(count)]


def test_frame_roundtrip():
    data = b"".join(_records(5))
    frames, valid = scan_frames(data)
    assert valid == len(data)
    assert [f.payload["seq"] for f in frames] == [0, 1, 2, 3, 4]
    assert all(f.rtype is RecordType.INTENT for f in frames)


def test_torn_tail_every_offset():
    records = _records(4)
    data = b"".join(records)
    ends = [sum(len(r) for r in records[:i + 1]) for i in range(len(records))]
    for cut in range(len(data) + 1):
        frames, valid = scan_frames(data[:cut])
        expected = sum(1 for end in ends if end <= cut)
        assert len(frames) == expected, f"cut at byte {cut}"
        assert valid == (ends[expected - 1] if expected else 0), f"cut at byte {cut}"


def test_corrupt_byte_stops_scan():
    records = _records(3)
    data = bytearray(b"".join(records))
    second = len(records[0])
    for position in (second + 2, second + 5, second + HEADER_SIZE + 3):  # type, length, payload
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        frames, valid = scan_frames(bytes(damaged))
        assert len(frames) == 1, f"flip at byte {position}"
        assert valid == second


def test_request_hash_excludes_volatile_fields():
    base = ToolRequest(command="ls", env=(("B", "2"), ("A", "1")), extra=(("sandbox_id", "sbx-1"),))
    other = ToolRequest(command="ls", env=(("A", "1"), ("B", "2")), extra=(("sandbox_id", "sbx-2"),))
    assert request_hash(base) == request_hash(other)
    assert request_hash(base) != request_hash(ToolRequest(command="ls -a"))
    assert request_hash(base) != request_hash(ToolRequest(command="ls", stdin=b"x"))
    assert request_hash(ToolRequest(argv=["ls"])) != request_hash(ToolRequest(command="ls"))


def test_request_record_roundtrip():
    request = ToolRequest(argv=["cat"], stdin=b"\x00\xff", env=(("K", "v"),), cwd="/w", timeout_s=2.5,
                          files=(("/w/a", "ab" * 32),), extra=(("note", 1),))
    assert ToolRequest.from_record(request.to_record()) == request


def test_canonical_json_rejects_nan():
    assert canonical_json({"b": 0.1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":0.1}'.encode()
    with pytest.raises(ValueError, match="finite"):
        canonical_json({"x": float("nan")})


def test_idem_and_result_hashes():
    assert idem_key("r", "t", 1, 0, "h") != idem_key("r", "t", 1, 1, "h")
    assert idem_key("r", "t", 1, 0, "h") == idem_key("r", "t", 1, 0, "h")
    assert result_hash(ToolResult(0, b"a")) == result_hash(ToolResult(0, b"a", replayed=True))
    assert result_hash(ToolResult(0, b"a")) != result_hash(ToolResult(1, b"a"))


def test_segment_group_commit_and_roll(tmp_path):
    writer = SegmentWriter(tmp_path, "w1", group_records=4, group_ms=1e9, segment_bytes=600)
    for i in range(3):
        writer.append(RecordType.RESULT, {"run": "r", "traj": f"t{i % 2}", "seq": i})
    first = writer.path
    assert first.stat().st_size == 0  # three records still buffered
    writer.append(RecordType.RESULT, {"run": "r", "traj": "t0", "seq": 3})
    assert len(read_segment(first)[0]) == 4  # the fourth record completed the group
    for i in range(4, 40):
        writer.append(RecordType.RESULT, {"run": "r", "traj": f"t{i % 2}", "seq": i}, durable=True)
    writer.close()
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) > 1
    total = 0
    for path in segments:
        frames, valid, size = read_segment(path)
        index = read_sparse_index(path)
        assert valid == size
        assert index is not None
        assert sorted(o for offsets in index.values() for o in offsets) == [f.offset for f in frames]
        total += len(frames)
    assert total == 40


def test_sparse_index_ignored_after_change(tmp_path):
    writer = SegmentWriter(tmp_path, "w1")
    writer.append(RecordType.RESULT, {"run": "r", "traj": "t", "seq": 0})
    writer.close()
    path = next(tmp_path.glob("*.seg"))
    assert read_sparse_index(path) == {"r/t": [0]}
    with open(path, "ab") as handle:
        handle.write(b"xx")
    assert read_sparse_index(path) is None


def test_blob_store(tmp_path):
    store = BlobStore(tmp_path)
    digest = store.put(b"payload")
    assert store.get(digest) == b"payload"
    assert store.put(b"payload") == digest
    assert store.digests() == {digest}
    store.path_for(digest).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="corrupt"):
        store.get(digest)
    with pytest.raises(ValueError, match="sha256"):
        store.path_for("../etc")
    assert not [p for p in os.listdir(tmp_path / digest[:2]) if p.endswith(".tmp")]


def test_epochs_distinct_under_races(tmp_path):
    taken: list[int] = []

    def take() -> None:
        for _ in range(5):
            taken.append(leases.take_epoch(tmp_path, "run", "t", "worker"))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 21))
    assert leases.current_epoch(tmp_path, "run", "t") == 20
    assert leases.is_stale(tmp_path, "run", "t", 19)
    assert not leases.is_stale(tmp_path, "run", "t", 20)


def test_request_needs_one_command_form():
    with pytest.raises(ValueError, match="exactly one"):
        ToolRequest(argv=["ls"], command="ls")
    with pytest.raises(ValueError, match="exactly one"):
        ToolRequest()

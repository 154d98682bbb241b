"""Fold a trajectory's records into the state a resume needs.

Every record carries the writer's `epoch` and a per-epoch sequence number `seq`. A
RESUME record of epoch e names the previous epoch and the last `seq` of it that the new
writer read. Records of that epoch with a larger `seq` were appended by a stale writer
after it was fenced, so they are ignored. Epochs that no RESUME chain reaches are ignored too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .framing import Frame, RecordType

StepKey = tuple[int, int]  # (step, call)


@dataclass
class CallEntry:
    """The INTENT of one call and, once it finished, its RESULT."""

    step: int
    call: int
    intent: dict[str, Any]
    result: dict[str, Any] | None = None

    @property
    def idempotent(self) -> bool:
        return bool(self.intent["idempotent"])

    @property
    def idem_key(self) -> str:
        return self.intent["idem_key"]

    @property
    def request_hash(self) -> str:
        return self.intent["request_hash"]


@dataclass
class TrajectoryState:
    run_id: str
    traj_id: str
    begin: dict[str, Any] | None = None
    calls: dict[StepKey, CallEntry] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # SNAPSHOT payloads, oldest first
    models: dict[int, dict[str, Any]] = field(default_factory=dict)
    rewards: list[dict[str, Any]] = field(default_factory=list)
    aborted: dict[StepKey, CallEntry] = field(default_factory=dict)  # calls dropped by ABORT
    sandbox_id: str | None = None
    last_epoch: int = 0
    last_seq: int = -1  # last accepted seq of last_epoch
    ended: bool = False
    consumed: bool = False
    ignored_records: int = 0  # records dropped by epoch fencing

    @property
    def exists(self) -> bool:
        return self.begin is not None

    def completed(self) -> list[CallEntry]:
        return sorted((e for e in self.calls.values() if e.result is not None), key=lambda e: (e.step, e.call))

    def in_doubt(self) -> list[CallEntry]:
        return sorted((e for e in self.calls.values() if e.result is None), key=lambda e: (e.step, e.call))


def _valid_frames(frames: list[Frame]) -> tuple[list[Frame], int]:
    """Return the frames that survive epoch fencing, in write order, and the count dropped."""
    by_epoch: dict[int, list[Frame]] = {}
    for frame in frames:
        by_epoch.setdefault(int(frame.payload.get("epoch", 0)), []).append(frame)
    starters = {epoch for epoch, group in by_epoch.items()
                if any(f.rtype in (RecordType.TRAJ_BEGIN, RecordType.RESUME) for f in group)}
    if not starters:
        return [], len(frames)
    chain: list[tuple[int, int | None]] = []  # (epoch, max seq or None for no cut), newest first
    epoch: int | None = max(starters)
    cutoff: int | None = None
    while epoch is not None:
        chain.append((epoch, cutoff))
        group = by_epoch.get(epoch, [])
        resume = next((f for f in group if f.rtype == RecordType.RESUME), None)
        if resume is None or resume.payload.get("prev_epoch") is None:
            break
        epoch, cutoff = int(resume.payload["prev_epoch"]), int(resume.payload["prev_seq"])
    valid: list[Frame] = []
    for epoch, cutoff in reversed(chain):
        group = sorted(by_epoch.get(epoch, []), key=lambda f: f.payload["seq"])
        valid.extend(f for f in group if cutoff is None or f.payload["seq"] <= cutoff)
    return valid, len(frames) - len(valid)


def fold(run_id: str, traj_id: str, frames: list[Frame], parent: TrajectoryState | None = None) -> TrajectoryState:
    """Build the state of one trajectory from its frames (any segment order).

    `parent` is the folded parent trajectory when this one was forked from it; its calls
    and snapshots before the fork step are inherited.
    """
    state = TrajectoryState(run_id, traj_id)
    valid, state.ignored_records = _valid_frames(frames)
    for frame in valid:
        payload = frame.payload
        state.last_epoch, state.last_seq = int(payload["epoch"]), int(payload["seq"])
        if payload.get("sandbox_id"):
            state.sandbox_id = payload["sandbox_id"]
        rtype = frame.rtype
        if rtype == RecordType.TRAJ_BEGIN:
            state.begin = payload
            fork = payload.get("parent")
            if fork is not None and parent is not None:
                limit = int(fork["step"])
                state.calls.update({k: v for k, v in parent.calls.items() if k[0] < limit and v.result is not None})
                state.snapshots.extend(s for s in parent.snapshots if s["step"] < limit)
        elif rtype == RecordType.INTENT:
            key = (int(payload["step"]), int(payload["call"]))
            old = state.calls.get(key)
            if old is not None and old.result is not None and old.request_hash == payload["request_hash"]:
                continue  # a re-sent INTENT for a call that already has its result
            state.calls[key] = CallEntry(key[0], key[1], payload)
        elif rtype == RecordType.RESULT:
            key = (int(payload["step"]), int(payload["call"]))
            entry = state.calls.get(key)
            if entry is not None and entry.idem_key == payload["idem_key"]:
                entry.result = payload
        elif rtype == RecordType.SNAPSHOT:
            state.snapshots.append(payload)
        elif rtype == RecordType.MODEL:
            state.models[int(payload["step"])] = payload
        elif rtype == RecordType.REWARD:
            state.rewards.append(payload)
        elif rtype == RecordType.ABORT:
            limit = int(payload["step"])
            for key in [k for k in state.calls if k[0] >= limit]:
                state.aborted[key] = state.calls.pop(key)
            state.snapshots = [s for s in state.snapshots if s["step"] < limit]
            state.models = {s: m for s, m in state.models.items() if s < limit}
            state.ended = False
        elif rtype == RecordType.TRAJ_END:
            state.ended = True
        elif rtype == RecordType.CONSUMED:
            state.consumed = True
    return state

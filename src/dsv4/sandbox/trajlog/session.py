"""A trajectory session: record tool calls live, replay them after a resume.

The agent loop calls `session.call(step, call, request, idempotent=...)` for every tool
call, on the first run and after a resume alike ("transparent" replay). While the log
has a RESULT for the same step key and request hash, the recorded result comes back
with replayed=True and nothing runs. Past the log's end, calls run live:

1. INTENT is appended. For a non-idempotent call it is written and fdatasync'd before
   the call starts (the writer's epoch is checked first).
2. The call runs through the in-sandbox journal, which refuses to start a key twice.
3. RESULT is appended and group-committed. Outputs above `inline_bytes` go to the blob
   store first.

A resume resolves calls with an INTENT but no RESULT through the journal of the sandbox
that ran them. A non-idempotent call whose sandbox is gone raises InDoubt, so it never
runs again silently. The sandbox itself is restored lazily, when the first live call
arrives (see `restore.py`).
"""

from __future__ import annotations

import base64
import enum
import logging
import time
import uuid
from typing import Any, Callable

from dsv4.sandbox.errors import InDoubt, ReplayDivergence

from . import leases
from .environment import EnvironmentProvider, ReplayEnvironment
from .errors import StaleWriter
from .framing import RecordType
from .hashing import ToolRequest, ToolResult, idem_key, request_hash, result_hash
from .journal import JournalEntry, JournalState
from .restore import restore_environment, try_reattach
from .state import CallEntry, TrajectoryState
from .store import TrajectoryLog, check_id

logger = logging.getLogger(__name__)

# Points of the two-phase protocol where a fault hook runs, in protocol order.
FAULT_POINTS = ("before_intent", "intent_written", "intent_durable", "executed", "result_appended", "returned")

FaultHook = Callable[[str, int, int], None]  # (point, step, call)


class DivergencePolicy(str, enum.Enum):
    STRICT = "strict"  # raise ReplayDivergence
    TRUNCATE = "truncate"  # ABORT at the step, rebuild the sandbox state before it, continue live
    FORK = "fork"  # continue under a new trajectory id that records its parent and the step


class TrajectorySession:
    """One worker's handle on one trajectory; create it with `TrajectorySession.open`.

    inline_bytes: stdout/stderr larger than this are stored as blobs (bytes).
    snapshot_every: take a sandbox snapshot after every N-th step (0 = only on request).
    in_doubt_wait_s: the maximum wait for a call that a dead worker left running, seconds.
    fault_hook: called at each FAULT_POINTS entry; tests use it to kill the worker.
    """

    def __init__(self, log: TrajectoryLog, run_id: str, traj_id: str, provider: EnvironmentProvider, *,
                 policy: DivergencePolicy | str = DivergencePolicy.STRICT, inline_bytes: int = 64 * 1024,
                 snapshot_every: int = 0, in_doubt_wait_s: float = 30.0,
                 fault_hook: FaultHook | None = None) -> None:
        check_id("run_id", run_id)
        check_id("traj_id", traj_id)
        self.log = log
        self.run_id = run_id
        self.traj_id = traj_id
        self.provider = provider
        self.policy = DivergencePolicy(policy)
        self.inline_bytes = inline_bytes
        self.snapshot_every = snapshot_every
        self.fault_hook = fault_hook
        self.in_doubt_wait_s = in_doubt_wait_s
        self.env: ReplayEnvironment | None = None
        self.epoch = 0
        self.seq = 0
        self.state = TrajectoryState(run_id, traj_id)
        self.resumed = False
        self.replayed_calls = 0
        self.live_calls = 0
        self.model_divergences = 0
        self._reattach_tried = False
        self._restore_limit: int | None = None  # sandbox state must be from before this step

    @classmethod
    def open(cls, log: TrajectoryLog, run_id: str, traj_id: str, provider: EnvironmentProvider, *,
             meta: dict[str, Any] | None = None, **options: Any) -> TrajectorySession:
        """Start a new trajectory, or resume it when the log already has it.

        meta: stored in TRAJ_BEGIN (policy version, sampling seed, image digest, ...).
        """
        session = cls(log, run_id, traj_id, provider, **options)
        session._take_lease(meta or {}, parent=None)
        return session

    # -- records --------------------------------------------------------------------

    def _take_lease(self, meta: dict[str, Any], parent: dict[str, Any] | None) -> None:
        # The epoch is taken before the log is read: anything a stale writer appends after
        # this read has a larger seq than the RESUME records as prev_seq, so readers drop it.
        self.epoch = leases.take_epoch(self.log.leases_dir, self.run_id, self.traj_id, self.log.writer_id)
        self.seq = 0
        self.state = self.log.load(self.run_id, self.traj_id)
        if self.state.exists:
            self.resumed = True
            self._append(RecordType.RESUME, {"prev_epoch": self.state.last_epoch, "prev_seq": self.state.last_seq},
                         durable=True)
            logger.info("trajectory %s/%s resumed at epoch %d: %d calls logged, %d in doubt, %d records fenced",
                        self.run_id, self.traj_id, self.epoch, len(self.state.completed()),
                        len(self.state.in_doubt()), self.state.ignored_records)
        else:
            payload = {"meta": meta, "parent": parent}
            self._append(RecordType.TRAJ_BEGIN, payload, durable=True)
            self.state = self.log.load(self.run_id, self.traj_id)

    def _append(self, rtype: RecordType, payload: dict[str, Any], *, durable: bool = False) -> dict[str, Any]:
        full = {"run": self.run_id, "traj": self.traj_id, "epoch": self.epoch, "seq": self.seq, **payload}
        self.seq += 1
        self.log.writer.append(rtype, full, durable=durable)
        return full

    def _check_fence(self) -> None:
        if leases.is_stale(self.log.leases_dir, self.run_id, self.traj_id, self.epoch):
            raise StaleWriter(self.run_id, self.traj_id, self.epoch)

    def _fault(self, point: str, step: int, call: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point, step, call)

    def _encode_output(self, data: bytes) -> dict[str, str]:
        if len(data) > self.inline_bytes:
            return {"blob": self.log.blobs.put(data)}  # durable before the RESULT that names it
        return {"b64": base64.b64encode(data).decode()}

    def _decode_output(self, field: dict[str, str]) -> bytes:
        if "blob" in field:
            return self.log.blobs.get(field["blob"])
        return base64.b64decode(field["b64"])

    def _result_from_record(self, payload: dict[str, Any]) -> ToolResult:
        return ToolResult(payload["exit_code"], self._decode_output(payload["stdout"]),
                          self._decode_output(payload["stderr"]), bool(payload["timed_out"]), replayed=True)

    def _record_result(self, entry: CallEntry, result: ToolResult, duration_s: float, *, recovered: bool) -> None:
        payload = self._append(RecordType.RESULT, {
            "step": entry.step, "call": entry.call, "idem_key": entry.idem_key,
            "exit_code": result.exit_code, "stdout": self._encode_output(result.stdout),
            "stderr": self._encode_output(result.stderr), "timed_out": result.timed_out,
            "result_hash": result_hash(result), "duration_s": round(duration_s, 6), "recovered": recovered,
            "sandbox_id": self.env.sandbox_id if self.env is not None else None,
        })
        entry.result = payload

    # -- tool calls -----------------------------------------------------------------

    def call(self, step: int, call: int, request: ToolRequest, *, idempotent: bool) -> ToolResult:
        """Return the result of tool call `call` of agent turn `step`, from the log or live.

        Calls of one session must not overlap: parallel tool calls of a turn get distinct
        `call` indexes but run one after another.
        """
        req_hash = request_hash(request)
        key = idem_key(self.run_id, self.traj_id, step, call, req_hash)
        entry = self.state.calls.get((step, call))
        if entry is not None and entry.request_hash != req_hash:
            self._diverge(step, call, entry.request_hash, req_hash)
            entry = None
            key = idem_key(self.run_id, self.traj_id, step, call, req_hash)  # traj_id may be new (fork)
        if entry is not None and entry.result is not None:
            self.replayed_calls += 1
            return self._result_from_record(entry.result)
        if entry is not None:
            recovered = self._resolve_in_doubt(entry)
            if recovered is not None:
                self.replayed_calls += 1
                return recovered
        return self._run_live(step, call, request, req_hash, key, idempotent)

    def _resolve_in_doubt(self, entry: CallEntry) -> ToolResult | None:
        """Settle a call with an INTENT but no RESULT; None means it never ran and may run now."""
        step_key = f"{entry.step}/{entry.call}"
        if self.env is None and not self._reattach_tried:
            self._reattach_tried = True
            self.env = try_reattach(self)
        if self.env is None:
            if entry.idempotent:
                return None
            raise InDoubt(step_key, entry.idem_key, "the sandbox that ran it is gone, so its journal cannot "
                          "tell whether it ran; drop or regenerate the trajectory")
        journal = self._wait_for_journal(entry)
        if journal.state is JournalState.DONE and journal.result is not None:
            logger.info("call %s of %s/%s recovered from the sandbox journal", step_key, self.run_id, self.traj_id)
            self._record_result(entry, journal.result, 0.0, recovered=True)
            return journal.result
        if journal.state is JournalState.ABSENT:
            return None
        if entry.idempotent:
            self.env.clear(entry.idem_key)
            return None
        raise InDoubt(step_key, entry.idem_key, f"sandbox {self.env.sandbox_id} journal shows it started "
                      "but never finished; drop or regenerate the trajectory")

    def _wait_for_journal(self, entry: CallEntry) -> JournalEntry:
        """Look the call up, waiting while it may still be running inside the sandbox.

        A worker that died during a call leaves the call running in its sandbox until it
        ends or its deadline kills it, so "started" is final only after that deadline
        (bounded by `in_doubt_wait_s`).
        """
        journal = self.env.lookup(entry.idem_key)
        timeout_s = entry.intent["request"].get("timeout_s") or self.in_doubt_wait_s
        deadline = min(entry.intent.get("written_at", 0.0) + timeout_s + 1.0, time.time() + self.in_doubt_wait_s)
        delay = 0.01
        while journal.state is JournalState.STARTED and not entry.idempotent and time.time() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            journal = self.env.lookup(entry.idem_key)
        return journal

    def _run_live(self, step: int, call: int, request: ToolRequest, req_hash: str, key: str,
                  idempotent: bool) -> ToolResult:
        if self.env is None:
            self._reattach_tried = True
            self.env = restore_environment(self)
            if self.env.sandbox_id != self.state.sandbox_id:
                # Durable before any call runs there, so a later resume reattaches this sandbox
                # instead of creating another one.
                # NOTE: a worker killed between creating the sandbox and this append leaves the
                # sandbox unowned until its lifetime ends.
                self._append(RecordType.SANDBOX, {"sandbox_id": self.env.sandbox_id}, durable=True)
                self.state.sandbox_id = self.env.sandbox_id
        self._fault("before_intent", step, call)
        intent = {"step": step, "call": call, "request": request.to_record(), "request_hash": req_hash,
                  "idem_key": key, "idempotent": idempotent, "sandbox_id": self.env.sandbox_id,
                  "written_at": time.time()}
        if idempotent:
            payload = self._append(RecordType.INTENT, intent)
            self._fault("intent_written", step, call)
        else:
            self._check_fence()
            payload = self._append(RecordType.INTENT, intent)
            self.log.writer.flush()
            self._fault("intent_written", step, call)
            self.log.writer.sync()
            self._fault("intent_durable", step, call)
        entry = CallEntry(step, call, payload)
        self.state.calls[(step, call)] = entry

        started = time.monotonic()
        try:
            result = self.env.run(request, key, idempotent=idempotent)
        except InDoubt as error:
            raise InDoubt(f"{step}/{call}", key, error.reason) from None
        self._fault("executed", step, call)
        self._record_result(entry, result, time.monotonic() - started, recovered=result.replayed)
        self._fault("result_appended", step, call)
        self.live_calls += 1
        if self.snapshot_every and call == 0 and (step + 1) % self.snapshot_every == 0:
            self.snapshot(step)
        self._fault("returned", step, call)
        return result

    def _diverge(self, step: int, call: int, recorded: str, new: str) -> None:
        if self.policy is DivergencePolicy.STRICT:
            raise ReplayDivergence(f"{step}/{call}", recorded, new)
        logger.warning("trajectory %s/%s diverged at %d/%d; policy %s", self.run_id, self.traj_id, step, call,
                       self.policy.value)
        if self.policy is DivergencePolicy.TRUNCATE:
            self._append(RecordType.ABORT, {"step": step, "reason": "request divergence"}, durable=True)
            self.state = self.log.load(self.run_id, self.traj_id)
        else:
            parent = {"run": self.run_id, "traj": self.traj_id, "step": step}
            self.log.writer.sync()
            self.traj_id = f"{self.traj_id}.fork{step}-{uuid.uuid4().hex[:8]}"
            self._take_lease({"forked_from": parent}, parent=parent)
        # The current sandbox contains effects of the dropped steps, so it cannot be reused.
        self.env = None
        self._reattach_tried = True
        self._restore_limit = step

    # -- other records --------------------------------------------------------------

    def snapshot(self, step: int) -> dict[str, Any] | None:
        """Snapshot the sandbox after `step` and log it; None when the layer cannot snapshot."""
        if self.env is None:
            return None
        # NOTE: old snapshots are never deleted here, so their storage grows by one per call;
        # restore only needs the newest one before a divergence point.
        ref = self.env.snapshot()
        if ref is None:
            return None
        payload = self._append(RecordType.SNAPSHOT, {"step": step, "ref": ref, "sandbox_id": self.env.sandbox_id},
                               durable=True)
        self.state.snapshots.append(payload)
        return ref

    def record_model(self, step: int, payload: dict[str, Any]) -> bool:
        """Log the model's output for a turn (token hash, logprobs, policy version).

        When the turn is already logged, nothing is appended and the return value says
        whether the new output matches the logged one. Batched sampling is not
        bit-reproducible, so a mismatch is counted in `model_divergences` and logged,
        not raised.
        """
        logged = self.state.models.get(step)
        if logged is not None:
            if logged["model"] == payload:
                return True
            self.model_divergences += 1
            logger.warning("trajectory %s/%s: model output of step %d differs from the logged one",
                           self.run_id, self.traj_id, step)
            return False
        self.state.models[step] = self._append(RecordType.MODEL, {"step": step, "model": payload})
        return True

    def history(self) -> list[dict[str, Any]]:
        """Return the logged turns in step order, to rebuild the agent's context without the model.

        Each turn is {"step", "model" (payload or None), "calls": [(call, ToolRequest, ToolResult)]}.
        """
        steps = sorted({step for step, _ in self.state.calls} | set(self.state.models))
        turns = []
        for step in steps:
            model = self.state.models.get(step)
            calls = [(entry.call, ToolRequest.from_record(entry.intent["request"]),
                      self._result_from_record(entry.result))
                     for entry in self.state.completed() if entry.step == step]
            turns.append({"step": step, "model": model["model"] if model else None, "calls": calls})
        return turns

    def record_reward(self, value: float, **extra: Any) -> None:
        self._append(RecordType.REWARD, {"reward": value, **extra}, durable=True)

    def end(self) -> None:
        self._append(RecordType.TRAJ_END, {}, durable=True)

    def mark_consumed(self) -> None:
        """Record that the trainer used the trajectory, which makes it collectable."""
        self._append(RecordType.CONSUMED, {}, durable=True)

    def close(self) -> None:
        self.log.writer.sync()

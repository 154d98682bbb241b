"""Replay fault injection against real function sandboxes.

A host process owns the sandboxes; rollout workers are forked from the test process and
SIGKILLed at every point of the two-phase protocol. Executions are counted inside the
sandbox: every non-idempotent call appends its step number to /work/counter.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import secrets
import shutil
import tempfile
import signal
import traceback
from pathlib import Path

import pytest
from trajlog_env import serve_function_host

from dsv4.sandbox.cluster.local import HostClient, HostProvider
from dsv4.sandbox.residue import find_residue
from dsv4.sandbox.trajlog import ToolRequest, TrajectoryLog, TrajectorySession
from dsv4.sandbox.trajlog.framing import scan_frames
from dsv4.sandbox.trajlog.journal import WRAPPER

STEPS = 52
RUN = "run"
PRE_EXEC = ("before_intent", "intent_written", "intent_durable")
POST_EXEC = ("during_exec", "executed", "result_appended", "returned")


def step_request(step: int) -> tuple[ToolRequest, bool]:
    """Return the call of a step and whether it is idempotent; every third step is not."""
    if step % 3 == 0:
        return ToolRequest(command=f"echo {step} >> /work/counter && wc -l < /work/counter"), False
    if step == 25:
        return ToolRequest(command="head -c 70000 /dev/zero | tr '\\0' a"), True  # stored as a blob
    if step % 3 == 1:
        return ToolRequest(command=f"printf 'read {step}: '; wc -l < /work/counter; echo note{step} >&2"), True
    return ToolRequest(argv=("sh", "-c", f"cat > /work/in{step}; wc -c < /work/in{step}"), stdin=b"x" * step), True


def outcome(results) -> list[tuple]:
    return [(r.exit_code, r.stdout, r.stderr, r.timed_out) for r in results]


class KillingClient(HostClient):
    """A HostClient that dies after sending the wrapped call of one step (the call keeps running)."""

    def __init__(self, socket_path, authkey, kill_step: int | None) -> None:
        super().__init__(socket_path, authkey)
        self.kill_step = kill_step
        self.current_step = -1

    def _call(self, method, *args):
        argv = args[1] if method == "exec" else None
        if argv is not None and self.current_step == self.kill_step and argv[:3] == ["sh", "-c", WRAPPER]:
            from multiprocessing.connection import Client
            connection = Client(self.socket_path, family="AF_UNIX", authkey=self._authkey)
            connection.send((method, args))
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._call(method, *args)


def run_worker(log_root: Path, traj: str, client_args, last_step: int, kill_at, out: Path) -> int:
    """Fork a worker that runs steps 0..last_step; return its exit code (-9 when killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            kill_step, kill_point = kill_at if kill_at else (None, None)
            client = KillingClient(*client_args, kill_step if kill_point == "during_exec" else None)

            def hook(point: str, step: int, call: int) -> None:
                client.current_step = step
                if (step, point) == (kill_step, kill_point):
                    os.kill(os.getpid(), signal.SIGKILL)

            session = TrajectorySession.open(TrajectoryLog(log_root), RUN, traj, HostProvider(client),
                                             fault_hook=hook, in_doubt_wait_s=10.0)
            results = []
            for step in range(last_step + 1):
                client.current_step = step
                request, idempotent = step_request(step)
                results.append(session.call(step, 0, request, idempotent=idempotent))
            if last_step == STEPS - 1:
                session.end()
            session.close()
            out.write_bytes(pickle.dumps(outcome(results)))
            code = 0
        except BaseException:
            out.with_suffix(".err").write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    base = tmp_path_factory.mktemp("faulthost")
    # Sandbox processes run as unprivileged uids that must traverse the state directory.
    state_dir = Path(tempfile.mkdtemp(prefix="dsv4-sbx-replay-", dir="/tmp"))
    os.chmod(state_dir, 0o755)
    socket_path = str(base / "host.sock")
    authkey = secrets.token_bytes(16)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    process = context.Process(target=serve_function_host, args=(str(state_dir), socket_path, authkey, stop))
    process.start()
    client = HostClient(socket_path, authkey)
    for _ in range(200):
        if os.path.exists(socket_path):
            break
        process.join(0.05)
    created: list[str] = []
    yield client, (socket_path, authkey), created
    assert sorted(client.sandbox_ids()) == sorted(created)  # resumes reattached, none created a sandbox
    stop.set()
    process.join(30)
    assert process.exitcode == 0
    for sandbox_id in created:
        assert find_residue(sandbox_id, str(state_dir)) == [], sandbox_id
    shutil.rmtree(state_dir)


def counter(client, sandbox_id: str) -> list[int]:
    result = client.exec(sandbox_id, ["cat", "/work/counter"], b"", None, {}, 10.0)
    return [int(line) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def reference(host, tmp_path_factory):
    """An uninterrupted run: its log, sandbox and results."""
    client, client_args, created = host
    root = tmp_path_factory.mktemp("reference") / "log"
    session = TrajectorySession.open(TrajectoryLog(root, group_records=4), RUN, "ref", HostProvider(client))
    results = [session.call(s, 0, step_request(s)[0], idempotent=step_request(s)[1]) for s in range(STEPS)]
    session.end()
    session.close()
    assert not any(r.replayed for r in results)
    created.append(session.env.sandbox_id)
    assert counter(client, session.env.sandbox_id) == list(range(0, STEPS, 3))
    return root, session.env.sandbox_id, outcome(results)


def test_kill_at_every_protocol_point(host, reference, tmp_path):
    client, client_args, created = host
    log_root = tmp_path / "log"
    hits: dict[str, int] = {}
    for step in range(STEPS):
        idempotent = step_request(step)[1]
        points = ["before_intent", "intent_written", *(() if idempotent else ("intent_durable",))]
        points += list(POST_EXEC) if idempotent else [POST_EXEC[(step // 3) % len(POST_EXEC)]]
        for point in points:
            out = tmp_path / f"w{step}-{point}.pkl"
            code = run_worker(log_root, "t", client_args, step, (step, point), out)
            assert not out.with_suffix(".err").exists(), out.with_suffix(".err").read_text()
            if point in PRE_EXEC or not idempotent or point == "during_exec":
                assert code == -signal.SIGKILL, f"worker was not killed at {point} of step {step} (exit {code})"
            if code == -signal.SIGKILL:
                hits[point] = hits.get(point, 0) + 1
    final = tmp_path / "final.pkl"
    assert run_worker(log_root, "t", client_args, STEPS - 1, None, final) == 0, final.with_suffix(".err")
    _, _, expected = reference
    assert pickle.loads(final.read_bytes()) == expected
    sandbox_id = TrajectoryLog(log_root).load(RUN, "t").sandbox_id
    created.append(sandbox_id)
    assert counter(client, sandbox_id) == list(range(0, STEPS, 3))  # each non-idempotent call ran once
    assert hits["before_intent"] == STEPS
    assert hits["intent_durable"] == len(range(0, STEPS, 3))
    assert all(hits.get(point, 0) >= 4 for point in POST_EXEC), hits


def test_truncate_log_tail_at_every_offset(host, reference, tmp_path):
    """Cut the reference log at every byte of its tail and resume against its sandbox."""
    client, _, created = host
    root, sandbox_id, expected = reference
    segments = sorted((root / "segments").glob("*.seg"))
    assert len(segments) == 1
    data = segments[0].read_bytes()
    frames, valid = scan_frames(data)
    assert valid == len(data)
    tail_records = 9  # INTENT and RESULT of steps 48-51 (48 and 51 are non-idempotent), then TRAJ_END
    tail_start = frames[-tail_records].offset

    cuts = range(tail_start, len(data) + 1)
    kept_at = {cut: sum(1 for f in frames if f.end <= cut) for cut in cuts}

    # Every cut inside one record leaves the same records. So a full resume runs for the
    # first, the middle and the last cut of each record, and the other cuts check the log only.
    resume_cuts: set[int] = set()
    for kept in set(kept_at.values()):
        same = [cut for cut in cuts if kept_at[cut] == kept]
        resume_cuts.update((same[0], same[len(same) // 2], same[-1]))

    resumed_per_class: dict[int, int] = {}
    for cut in cuts:
        kept = kept_at[cut]
        assert len(scan_frames(data[:cut])[0]) == kept, f"cut at byte {cut}"
        if cut not in resume_cuts:
            continue

        copy = tmp_path / f"cut{cut}"
        (copy / "segments").mkdir(parents=True)
        (copy / "segments" / segments[0].name).write_bytes(data[:cut])
        shutil.copytree(root / "blobs", copy / "blobs")
        session = TrajectorySession.open(TrajectoryLog(copy), RUN, "ref", HostProvider(client))
        results = [session.call(s, 0, step_request(s)[0], idempotent=step_request(s)[1]) for s in range(STEPS)]
        session.close()
        assert outcome(results) == expected, f"cut at byte {cut}"
        assert session.env is None or session.env.sandbox_id == sandbox_id
        resumed_per_class[kept] = resumed_per_class.get(kept, 0) + 1
        shutil.rmtree(copy)

    assert counter(client, sandbox_id) == list(range(0, STEPS, 3))  # nothing ran twice
    assert len(resumed_per_class) == tail_records + 1


def test_kill_after_exec_every_combination(host, reference, tmp_path):
    """Cover every (non-idempotent step, post-execution point) pair the rotation above skips.

    A kill after a non-idempotent call ran settles that step on resume (from the journal),
    so one trajectory can take only one post-execution kill per such step. Three more
    trajectories shift the rotation, so together with the test above every pair is hit.
    """
    client, client_args, created = host
    _, _, expected = reference
    for shift in range(1, len(POST_EXEC)):
        traj = f"shift{shift}"
        log_root = tmp_path / traj
        for step in range(0, STEPS, 3):
            point = POST_EXEC[(step // 3 + shift) % len(POST_EXEC)]
            out = tmp_path / f"{traj}-{step}.pkl"
            code = run_worker(log_root, traj, client_args, step, (step, point), out)
            assert not out.with_suffix(".err").exists(), out.with_suffix(".err").read_text()
            assert code == -signal.SIGKILL, f"{traj}: worker was not killed at {point} of step {step} (exit {code})"

        final = tmp_path / f"{traj}-final.pkl"
        assert run_worker(log_root, traj, client_args, STEPS - 1, None, final) == 0, final.with_suffix(".err")
        assert pickle.loads(final.read_bytes()) == expected
        sandbox_id = TrajectoryLog(log_root).load(RUN, traj).sandbox_id
        created.append(sandbox_id)
        assert counter(client, sandbox_id) == list(range(0, STEPS, 3))

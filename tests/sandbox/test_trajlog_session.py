"""Trajectory sessions: record, replay, in-doubt calls, fencing, divergence, restore, GC."""

from __future__ import annotations

import pytest
from trajlog_env import HostDirProvider

from dsv4.sandbox.errors import InDoubt, ReplayDivergence
from dsv4.sandbox.trajlog import (JournalUnavailable, StaleWriter, ToolRequest, TrajectoryLog, TrajectorySession,
                                  Unrecoverable, idem_key, request_hash)
from dsv4.sandbox.trajlog.gc import collect_garbage


class Crash(Exception):
    """Stands in for the worker dying at a fault point (its unflushed buffer is dropped)."""


def crash_at(point: str, step: int):
    def hook(name: str, at_step: int, call: int) -> None:
        if name == point and at_step == step:
            raise Crash(f"{name} at step {step}")
    return hook


def bump(step: int) -> ToolRequest:
    """Non-idempotent: appends a line to the counter file and prints the new count."""
    return ToolRequest(command=f"echo {step} >> counter; wc -l < counter")


def peek(step: int) -> ToolRequest:
    """Idempotent: reads the counter."""
    return ToolRequest(command=f"echo peek {step}; cat counter 2>/dev/null | wc -l")


def plan(steps: int) -> list[tuple[ToolRequest, bool]]:
    return [(bump(s), False) if s % 2 == 0 else (peek(s), True) for s in range(steps)]


def run_steps(session: TrajectorySession, steps: list[tuple[ToolRequest, bool]], start: int = 0):
    return [session.call(s, 0, req, idempotent=idem) for s, (req, idem) in enumerate(steps) if s >= start]


def counter_lines(provider: HostDirProvider, sandbox_id: str) -> list[str]:
    path = provider.base / sandbox_id / "counter"
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def setup(tmp_path):
    return tmp_path / "log", HostDirProvider(tmp_path / "sandboxes")


def test_record_then_replay(setup):
    root, provider = setup
    steps = plan(6)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    live = run_steps(first, steps)
    first.close()
    assert first.live_calls == 6
    assert [r.stdout for r in live[::2]] == [b"1\n", b"2\n", b"3\n"]

    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    replayed = run_steps(second, steps)
    assert second.resumed
    assert second.live_calls == 0
    assert all(r.replayed for r in replayed)
    assert [r.stdout for r in replayed] == [r.stdout for r in live]
    assert counter_lines(provider, "dir1") == ["0", "2", "4"]


def test_resume_continues_live_in_same_sandbox(setup):
    root, provider = setup
    steps = plan(6)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    run_steps(first, steps[:3])
    first.close()
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    results = run_steps(second, steps)
    assert second.replayed_calls == 3
    assert second.live_calls == 3
    assert provider.created == 1
    assert results[4].stdout == b"3\n"
    assert counter_lines(provider, "dir1") == ["0", "2", "4"]


def test_in_doubt_call_recovered_from_journal(setup):
    root, provider = setup
    steps = plan(4)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, fault_hook=crash_at("executed", 2))
    with pytest.raises(Crash):
        run_steps(first, steps)
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    assert [(e.step, e.idempotent) for e in second.state.in_doubt()] == [(2, False)]
    results = run_steps(second, steps)
    assert results[2].stdout == b"2\n"
    assert results[2].replayed
    assert counter_lines(provider, "dir1") == ["0", "2"]
    third = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    assert third.state.calls[(2, 0)].result["recovered"] is True


def test_in_doubt_call_that_never_started_runs(setup):
    root, provider = setup
    steps = plan(4)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider,
                                   fault_hook=crash_at("intent_durable", 2))
    with pytest.raises(Crash):
        run_steps(first, steps)
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    results = run_steps(second, steps)
    assert results[2].stdout == b"2\n"
    assert not results[2].replayed
    assert counter_lines(provider, "dir1") == ["0", "2"]


def test_started_but_unfinished_call_is_in_doubt(setup):
    root, provider = setup
    steps = plan(4)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider,
                                   fault_hook=crash_at("intent_durable", 2))
    with pytest.raises(Crash):
        run_steps(first, steps)
    key = idem_key("run", "t1", 2, 0, request_hash(steps[2][0]))
    (provider.base / "dir1" / ".journal" / key).mkdir()  # claimed by the wrapper, no exit status
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, in_doubt_wait_s=0.3)
    with pytest.raises(InDoubt, match="started but never finished"):
        run_steps(second, steps)
    assert counter_lines(provider, "dir1") == ["0"]


def test_lost_sandbox_makes_call_in_doubt(setup):
    root, provider = setup
    steps = plan(4)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, fault_hook=crash_at("executed", 2))
    with pytest.raises(Crash):
        run_steps(first, steps)
    (provider.base / "dir1").rename(provider.base / "gone")
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    with pytest.raises(InDoubt, match="gone"):
        run_steps(second, steps)


def test_lost_sandbox_without_snapshot_is_unrecoverable(setup):
    root, provider = setup
    steps = plan(4)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    run_steps(first, steps[:2])
    first.close()
    (provider.base / "dir1").rename(provider.base / "gone")
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    with pytest.raises(Unrecoverable, match="non-idempotent call 0/0"):
        run_steps(second, steps)


def test_lost_sandbox_restored_from_snapshot(setup):
    root, provider = setup
    steps = plan(8)
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, snapshot_every=3)
    run_steps(first, steps[:6])  # snapshot after step 2 and step 5; step 4 is non-idempotent
    first.close()
    assert provider.snapshots == 2
    (provider.base / "dir1").rename(provider.base / "gone")
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    results = run_steps(second, steps)
    assert provider.restored == 1
    assert results[6].stdout == b"4\n"
    assert counter_lines(provider, "dir2") == ["0", "2", "4", "6"]


def test_stale_writer_is_fenced(setup):
    root, provider = setup
    steps = plan(6)
    zombie = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    run_steps(zombie, steps[:2])
    zombie.close()
    resumed = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    assert resumed.epoch == 2
    zombie.call(3, 0, peek(3), idempotent=True)  # idempotent calls skip the fence check
    zombie.close()
    with pytest.raises(StaleWriter, match="epoch 1"):
        zombie.call(2, 0, bump(2), idempotent=False)
    reread = TrajectoryLog(root).load("run", "t1")
    assert (3, 0) not in reread.calls
    assert reread.ignored_records == 2  # the zombie's INTENT and RESULT
    results = run_steps(resumed, steps)
    # The zombie already ran step 3 in the sandbox, so its journaled result is returned.
    assert [r.replayed for r in results] == [True, True, False, True, False, False]


def test_divergence_strict_raises(setup):
    root, provider = setup
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    run_steps(first, plan(3))
    first.close()
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    second.call(0, 0, bump(0), idempotent=False)
    with pytest.raises(ReplayDivergence, match="step 1/0"):
        second.call(1, 0, peek(99), idempotent=True)


def test_divergence_truncate_rebuilds_state(setup):
    root, provider = setup
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, snapshot_every=1)
    run_steps(first, plan(4))
    first.close()
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, policy="truncate")
    second.call(0, 0, bump(0), idempotent=False)
    second.call(1, 0, peek(1), idempotent=True)
    result = second.call(2, 0, bump(20), idempotent=False)
    assert result.stdout == b"2\n"  # the restored snapshot of step 1 contains one line
    state = TrajectoryLog(root).load("run", "t1")
    assert sorted(state.calls) == [(0, 0), (1, 0), (2, 0)]
    assert state.calls[(2, 0)].intent["request"]["command"].startswith("echo 20")
    assert counter_lines(provider, second.env.sandbox_id) == ["0", "20"]


def test_divergence_fork_keeps_parent(setup):
    root, provider = setup
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    run_steps(first, plan(4))
    first.close()
    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, policy="fork")
    second.call(0, 0, bump(0), idempotent=False)
    second.call(1, 0, peek(1), idempotent=True)
    with pytest.raises(Unrecoverable):
        second.call(2, 0, bump(20), idempotent=False)  # no snapshot contains the state before step 2
    assert second.traj_id.startswith("t1.fork2-")
    parent = TrajectoryLog(root).load("run", "t1")
    child = TrajectoryLog(root).load("run", second.traj_id)
    assert sorted(parent.calls) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert sorted(child.calls) == [(0, 0), (1, 0)]
    assert child.begin["parent"] == {"run": "run", "traj": "t1", "step": 2}


def test_large_output_goes_to_blob(setup):
    root, provider = setup
    request = ToolRequest(command="head -c 300000 /dev/zero | tr '\\0' x")
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    live = first.call(0, 0, request, idempotent=True)
    first.close()
    log = TrajectoryLog(root)
    assert len(log.blobs.digests()) == 1
    replayed = TrajectorySession.open(log, "run", "t1", provider).call(0, 0, request, idempotent=True)
    assert replayed.replayed
    assert replayed.stdout == live.stdout == b"x" * 300000


def test_timeout_keeps_partial_output(setup):
    root, provider = setup
    session = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    result = session.call(0, 0, ToolRequest(command="echo early; sleep 5", timeout_s=0.5), idempotent=True)
    assert result.timed_out
    assert result.exit_code is None
    assert result.stdout == b"early\n"


def test_gc_collects_consumed_trajectories(setup):
    root, provider = setup
    log = TrajectoryLog(root, segment_bytes=1)  # one segment per sync
    kept = TrajectorySession.open(log, "run", "keep", provider)
    kept.call(0, 0, peek(0), idempotent=True)
    kept.close()
    done = TrajectorySession.open(log, "run", "done", provider, inline_bytes=4)
    done.call(0, 0, peek(0), idempotent=True)
    done.mark_consumed()
    done.close()
    report = collect_garbage(log, grace_s=0.0)
    assert report.trajectories_collected == 1
    assert report.segments_deleted >= 1
    assert report.blobs_deleted == 1
    assert not TrajectoryLog(root).load("run", "done").exists
    assert len(TrajectoryLog(root).load("run", "keep").completed()) == 1


def test_model_records_and_history(setup):
    root, provider = setup
    first = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    for step, (request, idempotent) in enumerate(plan(3)):
        assert first.record_model(step, {"tokens_sha256": f"h{step}", "policy": 3})
        first.call(step, 0, request, idempotent=idempotent)
    first.close()

    second = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    turns = second.history()
    assert [turn["step"] for turn in turns] == [0, 1, 2]
    assert turns[1]["model"] == {"tokens_sha256": "h1", "policy": 3}
    assert turns[2]["calls"][0][1] == bump(2)
    assert turns[2]["calls"][0][2].stdout == b"2\n"
    assert second.record_model(0, {"tokens_sha256": "h0", "policy": 3})
    assert not second.record_model(1, {"tokens_sha256": "other", "policy": 3})
    assert second.model_divergences == 1
    assert provider.created == 1  # rebuilding the history needed no sandbox


def test_gc_keeps_parent_of_live_fork(setup):
    root, provider = setup
    log = TrajectoryLog(root, segment_bytes=1)
    first = TrajectorySession.open(log, "run", "t1", provider, snapshot_every=1)
    run_steps(first, plan(3))
    first.close()
    forked = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider, policy="fork")
    forked.call(0, 0, bump(0), idempotent=False)
    forked.call(1, 0, peek(9), idempotent=True)  # diverges at step 1: continues as a fork
    forked.close()
    TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider).mark_consumed()

    report = collect_garbage(TrajectoryLog(root), grace_s=0.0)
    assert report.trajectories_collected == 0
    child = TrajectoryLog(root).load("run", forked.traj_id)
    assert sorted(child.calls) == [(0, 0), (1, 0)]
    assert child.calls[(0, 0)].result is not None


def test_unwritable_journal_raises(setup):
    root, provider = setup
    session = TrajectorySession.open(TrajectoryLog(root), "run", "t1", provider)
    session.env = provider.create()
    (provider.base / session.env.sandbox_id / ".journal").write_text("a file, not a directory")
    with pytest.raises(JournalUnavailable, match="journal_dir"):
        session.call(0, 0, bump(0), idempotent=False)
    assert counter_lines(provider, session.env.sandbox_id) == []

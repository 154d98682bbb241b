"""The replay journal on the container and microVM layers: crash after a call, resume, recover."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from layer_support import assert_no_residue

from dsv4.sandbox import Host, SandboxSpec
from dsv4.sandbox.cluster.local import HostProvider, SandboxHost
from dsv4.sandbox.trajlog import ToolRequest, TrajectoryLog, TrajectorySession


class Crash(Exception):
    """Stands in for the worker dying right after a call ran."""


def crash_after_step_2(point: str, step: int, call: int) -> None:
    if point == "executed" and step == 2:
        raise Crash(point)


def bump(step: int) -> ToolRequest:
    return ToolRequest(command=f"mkdir -p /work && echo {step} >> /work/counter && wc -l < /work/counter")


@pytest.mark.parametrize("layer", ["container", "microvm"])
def test_crash_resume_recovers_from_journal(layer, tmp_path):
    state_dir = tempfile.mkdtemp(prefix="dsv4-sbx-replay-", dir="/tmp")
    os.chmod(state_dir, 0o755)
    host = SandboxHost(Host(state_dir, reap_interval_s=3600), SandboxSpec(layer=layer, memory_mb=256))
    try:
        first = TrajectorySession.open(TrajectoryLog(tmp_path), "run", "t", HostProvider(host),
                                       fault_hook=crash_after_step_2)
        with pytest.raises(Crash):
            for step in range(4):
                first.call(step, 0, bump(step), idempotent=False)
        sandbox_id = first.env.sandbox_id

        second = TrajectorySession.open(TrajectoryLog(tmp_path), "run", "t", HostProvider(host))
        results = [second.call(step, 0, bump(step), idempotent=False) for step in range(4)]
        assert [r.stdout for r in results] == [b"1\n", b"2\n", b"3\n", b"4\n"]
        assert [r.replayed for r in results] == [True, True, True, False]
        assert second.env.sandbox_id == sandbox_id
        counter = host.exec(sandbox_id, ["cat", "/work/counter"], b"", None, {}, 30.0)
        assert counter.stdout.split() == [b"0", b"1", b"2", b"3"]
    finally:
        host.close()
    try:
        assert_no_residue(sandbox_id, host.host)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

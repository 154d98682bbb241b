"""Host control: admission, lookup, lifetimes, and reaping after a crashed host process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dsv4.sandbox import Busy, Host, Sandbox, SandboxLost, SandboxNotFound, naming
from dsv4.sandbox.residue import find_residue
from layer_support import assert_no_residue, temporary_host


def test_admission_rejects_over_budget():
    with temporary_host(cpu_budget=2.0, memory_budget_mb=256, retry_after_s=0.5) as host:
        first = Sandbox.create(layer="function", host=host, cpu=1, memory_mb=128)
        second = Sandbox.create(layer="container", host=host, cpu=1, memory_mb=64)
        with pytest.raises(Busy) as caught:
            Sandbox.create(layer="function", host=host, cpu=0.5, memory_mb=64)
        assert caught.value.retry_after_s == 0.5
        assert "CPU budget" in str(caught.value)
        assert host.reserved() == (2.0, 192)

        second.kill()
        with pytest.raises(Busy, match="memory budget"):
            Sandbox.create(layer="function", host=host, cpu=0.5, memory_mb=192)
        third = Sandbox.create(layer="function", host=host, cpu=0.5, memory_mb=64)
        assert host.reserved() == (1.5, 192)
        first.kill()
        third.kill()
        assert host.reserved() == (0.0, 0)


def test_connect_and_list_by_label():
    with temporary_host() as host:
        sandbox = Sandbox.create(layer="function", host=host, memory_mb=64,
                                 labels={"job": "a"})
        assert Sandbox.connect(sandbox.id, host=host).exec("echo same").stdout == b"same\n"
        assert [s.id for s in Sandbox.list({"job": "a"}, host=host)] == [sandbox.id]
        assert Sandbox.list({"job": "b"}, host=host) == []
        sandbox.kill()
        with pytest.raises(SandboxNotFound):
            Sandbox.connect(sandbox.id, host=host)


def test_lifetime_expiry_reaps_sandbox():
    with temporary_host() as host:
        sandbox = Sandbox.create(layer="container", host=host, memory_mb=64, lifetime_s=0.2)
        keeper = Sandbox.create(layer="container", host=host, memory_mb=64, lifetime_s=0.2)
        keeper.set_timeout(60)
        time.sleep(0.3)
        assert host.reap() == [sandbox.id]
        assert not sandbox.is_running()
        assert keeper.is_running()
        assert_no_residue(sandbox.id, host)
        keeper.kill()


CRASHING_HOST = textwrap.dedent("""
    import os, signal, sys
    from dsv4.sandbox import Host, Sandbox
    host = Host(sys.argv[1], reap_interval_s=3600)
    ids = []
    for layer in ("function", "container"):
        sandbox = Sandbox.create(layer=layer, host=host, memory_mb=64)
        ids.append(sandbox.id)
    shell = Sandbox.connect(ids[1], host=host).session("bash")
    shell.run("sleep 1000 &")
    print(" ".join(ids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_restart_reaps_crashed_host_leftovers():
    with temporary_host() as host:
        state_dir = host.state_dir
        host.close()
        src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
        crashed = subprocess.run([sys.executable, "-c", CRASHING_HOST, state_dir],
                                 capture_output=True, env={**os.environ, "PYTHONPATH": src},
                                 timeout=60)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
        ids = crashed.stdout.decode().split()
        assert len(ids) == 2
        assert all(find_residue(sandbox_id, state_dir) for sandbox_id in ids)

        restarted = Host(state_dir, reap_interval_s=3600)
        try:
            for sandbox_id in ids:
                assert_no_residue(sandbox_id, restarted)
        finally:
            restarted.close()


def test_reaper_ignores_other_hosts():
    with temporary_host() as first, temporary_host() as second:
        sandbox = Sandbox.create(layer="container", host=first, memory_mb=64)
        assert second.reap() == []
        assert sandbox.exec("echo alive").stdout == b"alive\n"
        sandbox.kill()


def test_create_kill_cycles_leave_nothing():
    with temporary_host() as host:
        for cycle in range(20):
            for layer in ("function", "container"):
                sandbox = Sandbox.create(layer=layer, host=host, memory_mb=32)
                assert sandbox.exec(f"echo {cycle}").stdout == f"{cycle}\n".encode()
                sandbox.kill()
        assert host.list() == []
        assert_no_residue(naming.host_tag(host.state_dir) + "-", host)


def test_capability_table_lists_layers():
    table = Sandbox.capability_table()
    assert {"function", "container", "container-runsc"} <= set(table)
    assert table["container"].snapshot_fs and not table["container"].snapshot_full
    assert table["container-runsc"].snapshot_full
    assert not table["function"].sessions


def test_periodic_reaper_ends_lifetime():
    with temporary_host(reap_interval_s=0.2) as host:
        sandbox = Sandbox.create(layer="function", host=host, memory_mb=32, lifetime_s=0.3)
        deadline = time.monotonic() + 5
        while sandbox.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not sandbox.is_running()
        assert_no_residue(sandbox.id, host)


@pytest.mark.parametrize("layer", ["function", "container"])
def test_kill_during_exec_raises_sandbox_lost(layer):
    with temporary_host() as host:
        sandbox = Sandbox.create(layer=layer, host=host, memory_mb=32)
        outcome: list[BaseException | object] = []

        def run() -> None:
            try:
                outcome.append(sandbox.exec("echo started; sleep 30", timeout_s=60))
            except BaseException as error:  # noqa: BLE001 - the test inspects it
                outcome.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        start = time.monotonic()
        sandbox.kill()
        worker.join(10)
        assert not worker.is_alive()
        assert time.monotonic() - start < 5
        assert isinstance(outcome[0], SandboxLost), outcome
        assert_no_residue(sandbox.id, host)

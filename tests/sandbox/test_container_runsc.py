"""Container layer on gVisor (runsc): exec, sessions, files, full snapshot, fork, kill."""

from __future__ import annotations

import shutil
import time

import pytest

from dsv4.sandbox import Sandbox
from dsv4.sandbox.errors import InvalidSpec
from layer_support import assert_no_residue, temporary_host

RUNSC = {"layer": "container", "options": {"runtime": "runsc"}, "memory_mb": 256}
COUNTER_LOOP = ("(i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done) "
                "> /dev/null 2>&1 &")


@pytest.fixture(scope="module")
def host():
    with temporary_host() as host:
        yield host


@pytest.fixture(scope="module")
def sandbox(host):
    sandbox = Sandbox.create(host=host, **RUNSC)
    yield sandbox
    sandbox.kill()
    assert_no_residue(sandbox.id, host)


def test_exec_runs_on_gvisor_kernel(sandbox):
    result = sandbox.exec("uname -r; id -u; echo err >&2; exit 4")
    assert result.exit_code == 4
    assert result.stdout == b"4.4.0\n0\n"     # gVisor reports a fixed 4.4.0 kernel
    assert result.stderr == b"err\n"


def test_background_child_holding_pipes_is_killed(sandbox):
    start = time.monotonic()
    result = sandbox.exec("sleep 100 & echo done", timeout_s=20)
    assert result.stdout == b"done\n"
    assert time.monotonic() - start < 5


def test_files_visible_both_ways(sandbox):
    sandbox.files.write("/work/from-host.txt", "host")
    sandbox.exec("echo guest > /work/from-guest.txt")
    assert sandbox.exec("cat /work/from-host.txt").stdout == b"host"
    assert sandbox.files.read("/work/from-guest.txt") == b"guest\n"


def test_session_keeps_state(sandbox):
    with sandbox.session("bash") as shell:
        shell.run("export VALUE=7")
        assert shell.run("echo $VALUE").stdout == b"7\n"


def test_full_snapshot_keeps_running_process(host, sandbox):
    sandbox.exec(COUNTER_LOOP)
    time.sleep(0.5)
    ref = sandbox.snapshot("full")
    try:
        assert ref.kind == "full"
        clone = Sandbox.from_snapshot(ref, host=host)
        first = int(clone.exec("cat /tmp/counter").stdout)
        time.sleep(0.6)
        second = int(clone.exec("cat /tmp/counter").stdout)
        assert second > first > 1, "the restored loop did not continue from its saved count"
        assert int(sandbox.exec("cat /tmp/counter").stdout) > 1   # the source runs on too
        clone.kill()
        assert_no_residue(clone.id, host)
    finally:
        shutil.rmtree(ref.path, ignore_errors=True)


def test_full_snapshot_rejects_open_sessions(sandbox):
    shell = sandbox.session("bash")
    with pytest.raises(InvalidSpec, match="close the sandbox's sessions"):
        sandbox.snapshot("full")
    shell.close()


def test_capabilities_report_full_snapshots():
    capabilities = Sandbox.capabilities("container", runtime="runsc")
    assert capabilities.snapshot_full
    assert not Sandbox.capabilities("container").snapshot_full

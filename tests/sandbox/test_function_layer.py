"""Function layer: create, exec, call, files, limits, deadline, kill and residue."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

import sandbox_functions
from dsv4.sandbox import ExecTimeout, RemoteError, ResourceExhausted, Sandbox
from dsv4.sandbox.errors import SandboxLost
from layer_support import assert_no_residue, temporary_host


@pytest.fixture(scope="module")
def host():
    with temporary_host() as host:
        yield host


@pytest.fixture(scope="module")
def sandbox(host):
    sandbox = Sandbox.create(layer="function", host=host, memory_mb=128, pids=32, disk_mb=16,
                             env={"GREETING": "hi"})
    yield sandbox
    sandbox.kill()
    assert_no_residue(sandbox.id, host)


def test_exec_exit_code_and_output(sandbox):
    result = sandbox.exec("echo out; echo err >&2; exit 3")
    assert result.exit_code == 3
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert not result.timed_out


def test_exec_stdin_env_cwd(sandbox):
    result = sandbox.exec(["sh", "-c", "cat; echo $GREETING $EXTRA; pwd"], stdin=b"data\n",
                          env={"EXTRA": "there"}, cwd="/tmp")
    assert result.stdout == b"data\nhi there\n/tmp\n"


def test_exec_runs_unprivileged_without_network(sandbox):
    result = sandbox.exec("id -u; cat /proc/net/dev | wc -l")
    uid, dev_lines = result.stdout.split()
    assert int(uid) >= 200_000
    assert int(dev_lines) == 3      # two header lines and "lo" only


def test_call_returns_json_value(sandbox):
    assert sandbox.call(sandbox_functions.add, 2, 40) == 42
    info = sandbox.call(sandbox_functions.describe_process)
    assert info["uid"] >= 200_000
    assert info["cwd"] == "/work"
    assert info["tmpdir"].startswith("/tmp/call-")


def test_call_raises_remote_error(sandbox):
    with pytest.raises(RemoteError, match="ValueError: boom") as caught:
        sandbox.call(sandbox_functions.fail_with, "boom")
    assert "fail_with" in caught.value.remote_traceback


def test_call_memory_limit(sandbox):
    with pytest.raises(RemoteError, match="MemoryError"):
        sandbox.call(sandbox_functions.allocate_mb, 512)


def test_scratch_dir_removed_after_call(sandbox):
    sandbox.exec('echo x > "$TMPDIR/scratch.txt"')
    assert [e.name for e in sandbox.files.list("/tmp") if e.name.startswith("call-")] == []


def test_files_roundtrip(sandbox, tmp_path):
    sandbox.files.write("/work/dir/a.txt", "alpha")
    assert sandbox.exec("cat /work/dir/a.txt").stdout == b"alpha"
    sandbox.exec("echo beta > /work/dir/b.txt")
    assert sandbox.files.read("/work/dir/b.txt") == b"beta\n"
    assert [e.name for e in sandbox.files.list("/work/dir")] == ["a.txt", "b.txt"]

    local = tmp_path / "tree"
    sandbox.files.download("/work/dir", str(local))
    assert (local / "a.txt").read_text() == "alpha"
    sandbox.files.upload(str(local), "/work/copy")
    assert sandbox.files.read_text("/work/copy/b.txt") == "beta\n"

    sandbox.files.remove("/work/dir")
    assert not sandbox.files.exists("/work/dir")


def test_disk_limit(sandbox):
    result = sandbox.exec("head -c 32000000 /dev/zero > /work/big; echo rc=$?")
    assert b"rc=0" not in result.stdout
    sandbox.exec("rm -f /work/big")
    with pytest.raises(ResourceExhausted) as caught:
        sandbox.files.write("/work/big", b"x" * (32 << 20))
    assert caught.value.resource == "disk"
    sandbox.files.remove("/work/big")


FORK_UNTIL_LIMITED = """
import os, time
count = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        count += 1
except OSError:
    print("limited", count)
"""


def test_pids_limit(sandbox):
    result = sandbox.exec(["python3", "-c", FORK_UNTIL_LIMITED], timeout_s=20)
    word, count = result.stdout.split()
    assert word == b"limited"
    assert int(count) < 32


def test_deadline_keeps_partial_output(sandbox):
    start = time.monotonic()
    with pytest.raises(ExecTimeout) as caught:
        sandbox.exec("echo before; sleep 30; echo after", timeout_s=0.5)
    assert caught.value.result.stdout == b"before\n"
    assert caught.value.result.exit_code is None
    assert time.monotonic() - start < 2.0


def test_journal_entry_written(sandbox):
    sandbox.exec("echo journaled", idem_key="f" * 64)
    digest = sandbox.handle.journal_lookup("f" * 64)
    assert digest is not None and len(digest) == 64
    assert sandbox.handle.journal_lookup("0" * 64) is None


def test_pause_blocks_until_resume(sandbox):
    results = []
    sandbox.pause()
    try:
        worker = threading.Thread(target=lambda: results.append(sandbox.exec("echo resumed")))
        worker.start()
        worker.join(0.7)
        assert worker.is_alive(), "a call completed while the sandbox was paused"
    finally:
        sandbox.resume()
    worker.join(10)
    assert results[0].stdout == b"resumed\n"


def test_snapshot_restore_and_fork(host, sandbox):
    sandbox.exec("echo snap > /work/snap.txt")
    ref = sandbox.snapshot("fs")
    try:
        clones = [Sandbox.from_snapshot(ref, host=host), *sandbox.fork(1)]
        for clone in clones:
            assert clone.exec("cat /work/snap.txt").stdout == b"snap\n"
            clone.exec("echo mine > /work/own.txt")
            clone.kill()
            assert_no_residue(clone.id, host)
        assert not sandbox.files.exists("/work/own.txt")
        snapshots = os.path.join(host.state_dir, "snapshots", "function")
        assert os.listdir(snapshots) == [os.path.basename(ref.path)], "fork kept its snapshot"
    finally:
        shutil.rmtree(ref.path, ignore_errors=True)


def test_kill_is_idempotent_and_clean(host):
    sandbox = Sandbox.create(layer="function", host=host, memory_mb=64)
    sandbox.exec("echo x > /work/x")
    sandbox.kill()
    sandbox.kill()
    assert not sandbox.is_running()
    with pytest.raises(SandboxLost):
        sandbox.exec("true")
    assert_no_residue(sandbox.id, host)
    assert not os.path.exists(os.path.join(host.state_dir, "function", sandbox.id))

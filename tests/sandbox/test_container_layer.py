"""Container layer: create, exec, sessions, files, limits, deadline, snapshot, fork, kill."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time

import pytest

from dsv4.sandbox import AsyncSandbox, ExecTimeout, NotSupported, Sandbox
from dsv4.sandbox.errors import SandboxLost
from layer_support import assert_no_residue, temporary_host
from test_function_layer import FORK_UNTIL_LIMITED


@pytest.fixture(scope="module")
def host():
    with temporary_host() as host:
        yield host


@pytest.fixture(scope="module")
def sandbox(host):
    sandbox = Sandbox.create(layer="container", host=host, memory_mb=128, pids=32, disk_mb=16,
                             env={"GREETING": "hi"})
    yield sandbox
    sandbox.kill()
    assert_no_residue(sandbox.id, host)


def test_exec_exit_code_and_output(sandbox):
    result = sandbox.exec("echo out; echo err >&2; exit 3")
    assert result.exit_code == 3
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_exec_stdin_env_cwd(sandbox):
    result = sandbox.exec(["sh", "-c", "cat; echo $GREETING $EXTRA; pwd"], stdin=b"data\n",
                          env={"EXTRA": "there"}, cwd="/tmp")
    assert result.stdout == b"data\nhi there\n/tmp\n"


def test_namespaces_and_identity(sandbox):
    result = sandbox.exec("id -u; hostname; echo $$; cat /proc/net/dev | wc -l; "
                          "grep CapEff /proc/self/status")
    uid, hostname, pid, dev_lines, _, cap = result.stdout.split()
    assert uid == b"0"                      # root inside the user namespace only
    assert hostname.startswith(b"sbx-")
    assert int(pid) < 10                    # own pid namespace
    assert int(dev_lines) == 3              # loopback only
    assert cap == b"0000000000000000"       # no capabilities, even as uid 0


def test_filesystem_persists_between_execs(sandbox):
    sandbox.exec("echo kept > /tmp/state; mkdir -p /etc/app && echo conf > /etc/app/c")
    assert sandbox.exec("cat /tmp/state /etc/app/c").stdout == b"kept\nconf\n"


def test_usr_is_read_only(sandbox):
    result = sandbox.exec("touch /usr/bin/evil")
    assert result.exit_code != 0
    assert not os.path.exists("/usr/bin/evil")


def test_bash_session_keeps_state(sandbox):
    with sandbox.session("bash") as shell:
        shell.run("cd /tmp && export COUNT=41")
        result = shell.run("COUNT=$((COUNT+1)); echo $COUNT $(pwd); false")
        assert result.stdout == b"42 /tmp\n"
        assert result.exit_code == 1


def test_python_session_keeps_state(sandbox):
    with sandbox.session("python") as python:
        python.run("import math\nvalue = math.factorial(5)")
        assert python.run("print(value)").stdout == b"120\n"
        failed = python.run("raise KeyError('missing')")
        assert failed.exit_code == 1
        assert b"KeyError" in failed.stderr


def test_session_timeout_kills_session(sandbox):
    shell = sandbox.session("bash")
    with pytest.raises(ExecTimeout) as caught:
        shell.run("echo partial; sleep 30", timeout_s=0.5)
    assert caught.value.result.stdout.startswith(b"partial")
    with pytest.raises(SandboxLost):
        shell.run("echo again")
    shell.close()


def test_files_roundtrip_and_confinement(sandbox):
    sandbox.files.write("/work/a.txt", "alpha")
    assert sandbox.exec("cat /work/a.txt").stdout == b"alpha"
    sandbox.exec("ln -s /etc/passwd /work/link; echo b > /work/b.txt")
    assert sandbox.files.read("/work/b.txt") == b"b\n"
    assert b"sandbox:x:" in sandbox.files.read("/work/link")   # the sandbox's passwd
    names = [entry.name for entry in sandbox.files.list("/work")]
    assert names == ["a.txt", "b.txt", "link"]
    sandbox.files.remove("/work/link")
    assert os.path.exists("/etc/passwd")


def test_memory_limit_oom(sandbox):
    result = sandbox.exec(["python3", "-c", "b = [bytearray(1 << 20) for _ in range(400)]"])
    assert result.exit_code != 0
    assert result.oom_killed


def test_pids_limit(sandbox):
    result = sandbox.exec(["python3", "-c", FORK_UNTIL_LIMITED], timeout_s=20)
    word, count = result.stdout.split()
    assert word == b"limited"
    assert int(count) < 32


def test_disk_limit(sandbox):
    result = sandbox.exec("head -c 32000000 /dev/zero > /work/big; echo rc=$?")
    assert b"rc=0" not in result.stdout
    sandbox.exec("rm -f /work/big")


def test_deadline_keeps_partial_output(sandbox):
    start = time.monotonic()
    result = sandbox.exec("echo before; sleep 30", timeout_s=0.5, raise_on_timeout=False)
    assert result.timed_out
    assert result.stdout == b"before\n"
    assert time.monotonic() - start < 2.0


def test_journal_entry_written(sandbox):
    sandbox.exec("echo journaled", idem_key="e" * 64)
    assert len(sandbox.handle.journal_lookup("e" * 64)) == 64
    assert sandbox.exec("ls /run/sbx/journal").stdout.split() == [b"e" * 64]


def test_pause_blocks_until_resume(sandbox):
    results = []
    sandbox.pause()
    try:
        worker = threading.Thread(target=lambda: results.append(sandbox.exec("echo resumed")))
        worker.start()
        worker.join(0.7)
        assert worker.is_alive(), "an exec completed while the sandbox was paused"
    finally:
        sandbox.resume()
    worker.join(10)
    assert results[0].stdout == b"resumed\n"


def test_full_snapshot_not_supported(sandbox):
    with pytest.raises(NotSupported):
        sandbox.snapshot("full")


def test_snapshot_restore_and_fork(host, sandbox):
    sandbox.exec("echo snap > /work/snap.txt")
    ref = sandbox.snapshot("fs")
    try:
        restored = Sandbox.from_snapshot(ref, host=host)
        forks = sandbox.fork(2)
        for clone in [restored, *forks]:
            assert clone.id != sandbox.id
            assert clone.exec("cat /work/snap.txt").stdout == b"snap\n"
            clone.exec("echo mine > /work/own.txt")
            clone.kill()
            assert_no_residue(clone.id, host)
        assert not sandbox.files.exists("/work/own.txt")
    finally:
        shutil.rmtree(ref.path, ignore_errors=True)


def test_image_directory_layer(host, tmp_path):
    layer = tmp_path / "layer"
    (layer / "opt" / "app").mkdir(parents=True)
    (layer / "opt" / "app" / "version").write_text("1.2.3\n")
    os.chmod(tmp_path, 0o755)
    with Sandbox.create(f"dir:{layer}", layer="container", host=host, memory_mb=64) as box:
        assert box.exec("cat /opt/app/version").stdout == b"1.2.3\n"
        box.exec("echo changed > /opt/app/version")
    assert (layer / "opt" / "app" / "version").read_text() == "1.2.3\n"
    assert_no_residue(box.id, host)


@pytest.mark.parametrize("kind", ["squashfs", "erofs"])
def test_image_file_layer(host, tmp_path, kind):
    source = tmp_path / "tree"
    (source / "opt").mkdir(parents=True)
    (source / "opt" / "release").write_text(f"{kind}\n")
    image = tmp_path / ("layer.sqfs" if kind == "squashfs" else "layer.erofs")
    if kind == "squashfs":
        command = ["mksquashfs", str(source), str(image), "-quiet", "-noappend"]
    else:
        command = ["mkfs.erofs", "--quiet", str(image), str(source)]
    subprocess.run(command, check=True, capture_output=True)
    with Sandbox.create(f"dir:{image}", layer="container", host=host, memory_mb=64) as box:
        assert box.exec("cat /opt/release").stdout == f"{kind}\n".encode()
        box.exec("echo changed > /work/new")
    assert_no_residue(box.id, host)


def test_async_client(host):
    async def scenario() -> tuple[bytes, bytes]:
        async with await AsyncSandbox.create(layer="container", host=host, memory_mb=64) as box:
            await box.files.write("/work/x", "async")
            results = await asyncio.gather(box.exec("cat /work/x"), box.exec("echo two"))
            return results[0].stdout, results[1].stdout

    assert asyncio.run(scenario()) == (b"async", b"two\n")


def test_kill_is_idempotent_and_clean(host):
    sandbox = Sandbox.create(layer="container", host=host, memory_mb=64)
    shell = sandbox.session("bash")
    shell.run("sleep 1000 &")
    sandbox.kill()
    sandbox.kill()
    assert not sandbox.is_running()
    with pytest.raises(SandboxLost):
        sandbox.exec("true")
    assert_no_residue(sandbox.id, host)


def test_idle_timeout_kills_silent_command(sandbox):
    start = time.monotonic()
    result = sandbox.exec("echo one; sleep 0.2; echo two; sleep 30", timeout_s=30,
                          idle_timeout_s=1.0, raise_on_timeout=False)
    assert result.timed_out
    assert result.stdout == b"one\ntwo\n"
    assert time.monotonic() - start < 3.0

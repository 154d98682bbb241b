"""microVM and VM layers: exec, files, limits, deadline, snapshot, fork, pause, kill.

These boot real QEMU guests (TCG on hosts where KVM cannot run them). One sandbox per layer
serves the module. The first sandbox of a memory size builds a template snapshot in the cache
directory, and later sandboxes restore it. ``VM_MEMORY_MB`` and ``VM_DISK_MB`` match the escape
suite so both modules share one template per layer.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from dsv4.sandbox import ExecTimeout, NotSupported, Sandbox
from dsv4.sandbox.backends.qemu import find_qemu_pids
from dsv4.sandbox.backends.qemu_backend import process_name
from dsv4.sandbox.errors import SandboxError, SandboxFileNotFound, SandboxLost
from layer_support import assert_no_residue, temporary_host

VM_LAYERS = ["microvm", "vm"]
VM_MEMORY_MB = 160
VM_PIDS = 64
VM_DISK_MB = 64


@pytest.fixture(scope="module")
def host():
    with temporary_host() as host:
        yield host


def create(host, layer: str, **options) -> Sandbox:
    return Sandbox.create(layer=layer, host=host, memory_mb=VM_MEMORY_MB, pids=VM_PIDS,
                          disk_mb=VM_DISK_MB, env={"GREETING": "hi"}, **options)


def assert_gone(sandbox: Sandbox, host) -> None:
    assert_no_residue(sandbox.id, host)
    backend = host.backend(sandbox.layer, None)
    assert backend.residue(sandbox.id) == []


@pytest.fixture(scope="module", params=VM_LAYERS)
def sandbox(request, host):
    sandbox = create(host, request.param)
    yield sandbox
    sandbox.kill()
    assert_gone(sandbox, host)


def test_exec_stdin_cwd_env(sandbox):
    result = sandbox.exec("pwd; echo $GREETING $EXTRA; cat; echo err >&2; exit 3",
                          stdin=b"from-stdin\n", cwd="/tmp", env={"EXTRA": "there"})
    assert result.exit_code == 3
    assert result.stdout == b"/tmp\nhi there\nfrom-stdin\n"
    assert result.stderr == b"err\n"
    assert not result.timed_out


def test_idle_timeout_not_supported(sandbox):
    with pytest.raises(NotSupported):
        sandbox.exec("true", idle_timeout_s=1)


def test_exec_runs_unprivileged(sandbox):
    assert sandbox.exec("id -u").stdout == b"1000\n"
    denied = sandbox.exec("echo x > /etc/passwd")
    assert denied.exit_code != 0


def test_files_roundtrip(sandbox):
    payload = bytes(range(256)) * 64
    sandbox.files.write("/work/sub/data.bin", payload, mode=0o600)
    assert sandbox.files.read("/work/sub/data.bin") == payload
    entries = sandbox.files.list("/work/sub")
    assert [entry.name for entry in entries] == ["data.bin"]
    assert entries[0].size == len(payload)
    assert entries[0].mode == 0o600
    assert entries[0].type == "file"
    assert sandbox.exec("cat /work/sub/data.bin | wc -c").stdout.strip() == str(len(payload)).encode()
    sandbox.files.remove("/work/sub")
    with pytest.raises(SandboxFileNotFound):
        sandbox.files.read("/work/sub/data.bin")
    with pytest.raises(SandboxFileNotFound):
        sandbox.files.list("/work/sub")


def test_deadline_keeps_partial_output(sandbox):
    start = time.monotonic()
    result = sandbox.exec("echo started; sleep 100", timeout_s=1, raise_on_timeout=False)
    assert result.timed_out
    assert result.exit_code is None
    assert result.stdout == b"started\n"
    assert time.monotonic() - start < 10
    assert sandbox.exec("echo alive").stdout == b"alive\n"


def test_limits_are_guest_limits(sandbox):
    assert sandbox.exec("ulimit -u").stdout == f"{VM_PIDS}\n".encode()
    mem_total_kib = int(sandbox.exec("awk '/^MemTotal/ {print $2}' /proc/meminfo").stdout)
    assert VM_MEMORY_MB * 1024 * 0.6 < mem_total_kib <= VM_MEMORY_MB * 1024
    if sandbox.layer == "vm":
        root_kib = int(sandbox.exec("df -k / | awk 'NR == 2 {print $2}'").stdout)
        assert VM_DISK_MB * 1024 * 0.8 < root_kib <= VM_DISK_MB * 1024
    # Forking past the limit fails inside the guest; the shell reports it.
    result = sandbox.exec(f"sh -c 'for i in $(seq {VM_PIDS + 10}); do sleep 2 & done' 2>&1; "
                          "echo done", timeout_s=60)
    assert b"done" in result.stdout
    assert b"fork" in result.stdout.lower() or b"resource" in result.stdout.lower()
    sandbox.exec("kill -9 -1", timeout_s=30)


def test_no_network_device(sandbox):
    assert sandbox.exec("ls /sys/class/net").stdout.split() == [b"lo"]


def test_stats(sandbox):
    stats = sandbox.stats()
    # No process of the sandbox user is running between commands.
    assert stats.pids == 0, sandbox.handle._root("ps -o pid,ppid,user,stat,args").stdout
    assert stats.memory_bytes > 10 << 20
    assert stats.cpu_s > 0


def test_shell_session_keeps_state(sandbox):
    with sandbox.session("bash") as session:
        first = session.run("cd /tmp; COUNTER=41; echo set; echo warn >&2")
        assert first.exit_code == 0
        assert first.stdout == b"set\n"
        assert first.stderr == b"warn\n"
        second = session.run("COUNTER=$((COUNTER + 1)); pwd; echo $COUNTER $GREETING; false")
        assert second.stdout == b"/tmp\n42 hi\n"
        assert second.exit_code == 1
    assert sandbox.stats().pids == 0, "closing the session must end its processes"


def test_session_deadline_ends_session(sandbox):
    session = sandbox.session("bash")
    with pytest.raises(ExecTimeout) as timeout:
        session.run("echo before; sleep 100", timeout_s=1)
    assert timeout.value.result.timed_out
    assert timeout.value.result.stdout == b"before\n"
    with pytest.raises(SandboxLost):
        session.run("echo after")
    session.close()
    with pytest.raises(NotSupported):
        sandbox.session("python")


def test_journal_records_idem_key(sandbox):
    key = "idem-" + os.urandom(4).hex()
    assert sandbox.handle.journal_lookup(key) is None
    result = sandbox.exec("echo journaled", idem_key=key)
    from dsv4.sandbox.backends.base import result_digest
    assert sandbox.handle.journal_lookup(key) == result_digest(result)


def test_pause_resume(sandbox):
    sandbox.pause()
    try:
        with pytest.raises(SandboxError):
            sandbox.exec("true")
    finally:
        sandbox.resume()
    assert sandbox.exec("echo resumed").stdout == b"resumed\n"


def test_full_snapshot_fork(sandbox, host):
    sandbox.files.write("/work/state.txt", b"before-snapshot")
    children = sandbox.fork(2)
    try:
        names = set()
        for index, child in enumerate(children):
            assert child.files.read("/work/state.txt") == b"before-snapshot"
            child.files.write("/work/state.txt", f"child-{index}".encode())
            names.add(child.exec("hostname").stdout)
        assert len(names) == 2, "forked guests must get their own hostnames"
        assert children[0].files.read("/work/state.txt") == b"child-0"
        assert sandbox.files.read("/work/state.txt") == b"before-snapshot"
    finally:
        for child in children:
            child.kill()
    for child in children:
        assert_gone(child, host)


def test_fs_snapshot(sandbox, host):
    if sandbox.layer == "microvm":
        with pytest.raises(NotSupported):
            sandbox.snapshot("fs")
        return
    sandbox.exec("echo on-disk > /work/disk.txt; echo in-memory > /tmp/memory.txt")
    ref = sandbox.snapshot("fs")
    restored = Sandbox.from_snapshot(ref, host=host)
    try:
        assert restored.exec("cat /work/disk.txt").stdout == b"on-disk\n"
        # An fs snapshot keeps the disk only; /tmp is a tmpfs in guest memory.
        assert restored.exec("test -e /tmp/memory.txt").exit_code == 1
    finally:
        restored.kill()
    assert_gone(restored, host)


@pytest.mark.parametrize("layer", ["microvm"])
def test_dead_vm_reports_lost(host, layer):
    sandbox = create(host, layer)
    pids = find_qemu_pids(process_name(sandbox.id))
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(SandboxLost):
        sandbox.exec("echo never", timeout_s=5)
    assert not sandbox.is_running()
    sandbox.kill()
    assert_gone(sandbox, host)


def test_reap_removes_orphans(host):
    sandbox = create(host, "microvm")
    backend = host.backend("microvm", None)
    backend.forget(sandbox.id)          # as if the host process that owned it had died
    assert sandbox.id in backend.reap(set())
    assert_gone(sandbox, host)
    sandbox.kill()                      # idempotent after the reap

"""Escape suite: every layer must contain each attack, report it, and leave nothing behind.

To cover another layer, add its name to ``ESCAPE_LAYERS`` (and, if it needs other limits,
an entry to ``LAYER_OPTIONS``). One sandbox per layer serves the whole module, so slow-booting
layers start once. Each attack runs through ``Sandbox.exec`` with shell commands that work
with either GNU tools or busybox. The only network target is a listener this test opens on
127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time

import pytest

from dsv4.sandbox import Sandbox
from dsv4.sandbox.errors import SandboxFileNotFound, SandboxLost
from layer_support import assert_no_residue, temporary_host

ESCAPE_LAYERS = ["function", "container", "container-runsc", "microvm", "vm"]
# Sandbox.create arguments per entry of ESCAPE_LAYERS; "layer" defaults to the entry's name.
LAYER_OPTIONS: dict[str, dict] = {
    "function": {"memory_mb": 128, "pids": 64, "disk_mb": 64},
    "container": {"memory_mb": 128, "pids": 64, "disk_mb": 64},
    "container-runsc": {"layer": "container", "options": {"runtime": "runsc"},
                        "memory_mb": 256, "pids": 64, "disk_mb": 64},
    # Guest RAM and pids of the VM layers; test_vm_layers uses the same values, so both
    # modules restore from one cached template per layer.
    "microvm": {"memory_mb": 160, "pids": 64},
    "vm": {"memory_mb": 160, "pids": 64, "disk_mb": 64},
}
# Layers where a fork bomb may stop the sandbox (reported as SandboxLost) but never the host:
# gVisor's ptrace platform backs every guest task with host tasks under the same pids limit.
FORK_BOMB_ENDS_SANDBOX = {"container-runsc"}
# Deadline slack: the kill must land within timeout + this many seconds on a busy 2-core CI.
DEADLINE_SLACK_S = 1.5


@pytest.fixture(scope="module")
def host():
    with temporary_host() as host:
        yield host


@pytest.fixture(scope="module", params=ESCAPE_LAYERS)
def sandbox(request, host):
    arguments = {"layer": request.param, **LAYER_OPTIONS[request.param]}
    sandbox = Sandbox.create(host=host, **arguments)
    assert sandbox.exec("echo ready", timeout_s=60).stdout == b"ready\n"
    yield sandbox
    sandbox.kill()
    assert_no_residue(sandbox.id, host)


@pytest.fixture
def host_dir():
    """A host directory outside every sandbox, readable by everyone (the planted target)."""
    path = tempfile.mkdtemp(prefix="dsv4-escape-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def baseline_pids(sandbox):
    """Process count of the idle sandbox; after each attack it must be back to this value."""
    before = sandbox.stats().pids
    yield before
    # gVisor kills leftovers through several runsc calls, which take seconds on a busy host.
    deadline = time.monotonic() + 5.0
    while sandbox.stats().pids > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox.stats().pids <= before, "the attack left processes running in the sandbox"
    alive = sandbox.exec("echo alive", timeout_s=30)
    assert alive.stdout == b"alive\n", alive


def test_write_outside_root(sandbox, host_dir, baseline_pids):
    target = os.path.join(host_dir, "escaped.txt")
    result = sandbox.exec(f"mkdir -p {host_dir}; echo pwned > {target}; "
                          f"echo pwned > /../../..{target}", timeout_s=30)
    assert result.exit_code == 0 or result.exit_code != 0   # either outcome is fine inside
    assert not os.path.exists(target), "a sandbox command wrote a host file"

    try:
        sandbox.files.write(f"/../../..{target}", b"pwned")
    except (PermissionError, SandboxFileNotFound):
        pass
    assert not os.path.exists(target), "the file plane wrote a host file"


def test_read_planted_host_file(sandbox, host_dir, baseline_pids):
    secret = secrets.token_hex(16)
    planted = os.path.join(host_dir, "secret.txt")
    with open(planted, "w") as handle:
        handle.write(secret)
    os.chmod(planted, 0o644)

    result = sandbox.exec(f"cat {planted}; cat /../..{planted}", timeout_s=30)
    assert secret.encode() not in result.stdout
    assert secret.encode() not in result.stderr

    sandbox.exec(f"ln -sf {planted} /tmp/link-to-secret", timeout_s=30)
    try:
        leaked = sandbox.files.read("/tmp/link-to-secret")
    except (SandboxFileNotFound, PermissionError, OSError):
        leaked = b""
    assert secret.encode() not in leaked, "the file plane followed a symlink to the host"


def test_connect_loopback_listener(sandbox, baseline_pids):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted: list[tuple] = []

    def accept_loop(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                connection, peer = listener.accept()
                accepted.append(peer)
                connection.close()
            except socket.timeout:
                continue
            except OSError:
                return

    stop = threading.Event()
    thread = threading.Thread(target=accept_loop, args=(stop,))
    thread.start()
    try:
        connect = (f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), "
                   f"timeout=2); print('connected')\"")
        fallback = f"echo x | nc -w 2 127.0.0.1 {port} && echo connected"
        result = sandbox.exec(f"if command -v python3 >/dev/null; then {connect}; "
                              f"else {fallback}; fi", timeout_s=30)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert accepted == [], f"the sandbox reached the host loopback listener from {accepted}"
    assert b"connected" not in result.stdout
    assert result.exit_code != 0


def test_memory_bomb(sandbox, baseline_pids):
    limit_mb = sandbox.spec.memory_mb
    script = (f"python3 -c \"b = [bytearray(16 << 20) for _ in range({limit_mb * 4 // 16})]\" "
              f"2>&1 || echo failed-as-expected")
    result = sandbox.exec(f"if command -v python3 >/dev/null; then {script}; "
                          f"else tail /dev/zero || echo failed-as-expected; fi",
                          timeout_s=30, raise_on_timeout=False)
    assert not result.timed_out
    assert b"failed-as-expected" in result.stdout
    assert result.oom_killed or b"MemoryError" in result.stdout


def test_cpu_spin_past_deadline(sandbox, baseline_pids):
    start = time.monotonic()
    result = sandbox.exec("echo spinning; while :; do :; done", timeout_s=1,
                          raise_on_timeout=False)
    elapsed = time.monotonic() - start
    assert result.timed_out
    assert result.exit_code is None
    assert result.stdout == b"spinning\n", "partial output before the deadline was lost"
    assert elapsed < 1 + DEADLINE_SLACK_S


def test_sigterm_ignoring_child_holding_pipes(sandbox, baseline_pids):
    script = ("(trap '' TERM; exec sleep 1000) & "
              "setsid sh -c \"trap '' TERM; sleep 1000\" & "
              "echo started")
    start = time.monotonic()
    result = sandbox.exec(script, timeout_s=2, raise_on_timeout=False)
    elapsed = time.monotonic() - start
    assert b"started" in result.stdout
    assert elapsed < 2 + DEADLINE_SLACK_S, "exec hung on pipes held by a background child"


def test_hundred_megabytes_of_output(sandbox, baseline_pids):
    cap = 1 << 20
    result = sandbox.exec("head -c 100000000 /dev/zero; echo done >&2", timeout_s=60,
                          max_output=cap)
    assert result.truncated
    assert len(result.stdout) == cap
    assert result.stderr == b"done\n"
    assert result.exit_code == 0


def test_closed_output_still_meets_deadline(sandbox, baseline_pids):
    start = time.monotonic()
    result = sandbox.exec("echo closing; exec >&- 2>&-; sleep 30", timeout_s=1.5,
                          raise_on_timeout=False)
    assert result.timed_out
    assert result.stdout == b"closing\n"
    assert time.monotonic() - start < 1.5 + DEADLINE_SLACK_S


def test_fork_bomb(request, sandbox):
    """Runs last in the module because in some layers the bomb may end the sandbox."""
    try:
        result = sandbox.exec("bomb() { bomb | bomb & }; bomb; sleep 2; echo survived",
                              timeout_s=3, raise_on_timeout=False)
    except SandboxLost:
        layer = request.node.callspec.params["sandbox"]
        assert layer in FORK_BOMB_ENDS_SANDBOX, f"the fork bomb killed the {layer} sandbox"
        return
    assert result.timed_out or result.exit_code is not None
    assert result.duration_s < 3 + DEADLINE_SLACK_S
    assert sandbox.exec("echo alive", timeout_s=30).stdout == b"alive\n"


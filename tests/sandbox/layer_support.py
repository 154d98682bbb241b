"""Shared helpers for the per-layer sandbox tests: a throwaway host and residue checks.

Imported by test modules (``from layer_support import ...``); pytest puts this directory on
``sys.path`` because ``tests/sandbox`` has no ``__init__.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Iterator

from dsv4.sandbox import Host
from dsv4.sandbox.residue import find_residue


@contextlib.contextmanager
def temporary_host(**kwargs) -> Iterator[Host]:
    """Yield a Host on a fresh state directory; close it and delete the directory afterwards.

    The directory sits directly under /tmp with mode 0755 because sandbox processes run as
    unprivileged uids that must traverse it (pytest's tmp_path is mode 0700).
    """
    state_dir = tempfile.mkdtemp(prefix="dsv4-sbx-test-", dir="/tmp")
    os.chmod(state_dir, 0o755)
    kwargs.setdefault("reap_interval_s", 3600)
    host = Host(state_dir, **kwargs)
    try:
        yield host
    finally:
        host.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def assert_no_residue(sandbox_id: str, host: Host | str, wait_s: float = 3.0) -> None:
    """Assert nothing of the sandbox is left, allowing ``wait_s`` for asynchronous exits.

    ``sandbox_id`` may also be a host tag followed by "-", which matches all its sandboxes.
    The wait covers zombies of exited helpers (bubblewrap reports its exit status before
    reaping its own child, so that child is reaped by the host's init shortly after).
    """
    state_dir = host if isinstance(host, str) else host.state_dir
    deadline = time.monotonic() + wait_s
    leftovers = find_residue(sandbox_id, state_dir)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = find_residue(sandbox_id, state_dir)
    assert leftovers == [], f"sandbox {sandbox_id} left host resources behind: {leftovers}"

"""Host-directory environments for trajectory-log logic tests.

Each "sandbox" is a plain directory on the host and commands run there with
subprocess; there is no isolation. The replay fault-injection test uses real
function sandboxes instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping

from dsv4.sandbox.trajlog import ReplayEnvironment, ToolResult


class HostDirProvider:
    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.created = 0
        self.restored = 0
        self.snapshots = 0

    def _run(self, root: Path):
        def executor(argv: list[str], *, stdin: bytes, cwd: str | None, env: Mapping[str, str],
                     timeout_s: float | None) -> ToolResult:
            process = subprocess.Popen(argv, cwd=cwd or root, env={"PATH": os.environ["PATH"], **env},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
            try:
                out, err = process.communicate(stdin, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
                return ToolResult(None, out, err, timed_out=True)
            return ToolResult(process.returncode, out, err)
        return executor

    def _env(self, sandbox_id: str) -> ReplayEnvironment:
        root = self.base / sandbox_id
        return ReplayEnvironment(sandbox_id, self._run(root), str(root / ".journal"),
                                 snapshot=lambda: self._snapshot(root))

    def _snapshot(self, root: Path) -> dict[str, Any]:
        self.snapshots += 1
        target = self.base / f"snap{self.snapshots}"
        shutil.copytree(root, target, symlinks=True)
        return {"path": str(target)}

    def create(self) -> ReplayEnvironment:
        self.created += 1
        sandbox_id = f"dir{self.created + self.restored}"
        (self.base / sandbox_id).mkdir(parents=True)
        return self._env(sandbox_id)

    def reattach(self, sandbox_id: str) -> ReplayEnvironment | None:
        return self._env(sandbox_id) if (self.base / sandbox_id).is_dir() else None

    def restore(self, snapshot: dict[str, Any]) -> ReplayEnvironment | None:
        self.restored += 1
        sandbox_id = f"dir{self.created + self.restored}"
        shutil.copytree(snapshot["path"], self.base / sandbox_id, symlinks=True)
        return self._env(sandbox_id)


def serve_function_host(state_dir: str, socket_path: str, authkey: bytes, stop) -> None:
    """Run a SandboxHost of function sandboxes until `stop` (a multiprocessing Event) is set.

    Meant as the target of a spawned process: it plays the host daemon that outlives the
    rollout workers the tests kill.
    """
    from dsv4.sandbox import Host
    from dsv4.sandbox.cluster.local import HostServer, SandboxHost
    from dsv4.sandbox.types import SandboxSpec

    host = SandboxHost(Host(state_dir, reap_interval_s=3600), SandboxSpec(layer="function", memory_mb=256))
    server = HostServer(host, socket_path, authkey)
    try:
        stop.wait()
    finally:
        server.close()
        host.close()

"""Sandboxes on the nodes of a Ray cluster (optional extra: pip install 'dsv4[ray]').

One `HostAgent` actor per node owns that node's sandboxes (a `dsv4.sandbox.Host` with its
own state directory, so admission and reaping stay per node). A sandbox id handed to
callers is `<local id>@<node id>`, so any worker can route a call to the node that owns
the sandbox. `RayHosts.provider(traj_id)` places a trajectory on a node by rendezvous
hashing over the live nodes. A resumed trajectory lands on the node that may still have
its sandbox. When that node died, it lands on another node, and the session there
rebuilds the sandbox from the shared trajectory log (a snapshot, or a fresh sandbox
that re-runs the idempotent calls).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Mapping

try:
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as error:  # pragma: no cover - depends on the optional extra
    raise ImportError("dsv4.sandbox.cluster.ray_backend needs Ray: pip install 'dsv4[ray]'") from error

from dsv4.sandbox.cluster.local import REPLAY_JOURNAL_DIR, HostProvider, SandboxHost
from dsv4.sandbox.host import Host
from dsv4.sandbox.trajlog.hashing import ToolResult
from dsv4.sandbox.types import SandboxSpec

logger = logging.getLogger(__name__)

SEPARATOR = "@"
# Seconds to wait for an agent actor's reply to a liveness check.
PING_TIMEOUT_S = 10.0


class HostAgent:
    """Owns the sandboxes of one node; runs as a Ray actor pinned to that node."""

    def __init__(self, state_dir: str, spec: SandboxSpec) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        # One state directory per node, so a restarted agent on this node reaps what a dead one left.
        self.state_dir = os.path.join(state_dir, self.node_id[:16])
        self.sandboxes = SandboxHost(Host(self.state_dir), spec)

    def node(self) -> str:
        return self.node_id

    def create(self) -> str:
        return self.sandboxes.create()

    def alive(self, sandbox_id: str) -> bool:
        return self.sandboxes.alive(sandbox_id)

    def exec(self, sandbox_id: str, argv: list[str], stdin: bytes, cwd: str | None,
             env: Mapping[str, str], timeout_s: float | None) -> ToolResult:
        return self.sandboxes.exec(sandbox_id, argv, stdin, cwd, env, timeout_s)

    def snapshot(self, sandbox_id: str) -> dict[str, Any] | None:
        return self.sandboxes.snapshot(sandbox_id)

    def restore(self, snapshot: dict[str, Any]) -> str | None:
        return self.sandboxes.restore(snapshot)

    def kill(self, sandbox_id: str) -> None:
        self.sandboxes.kill(sandbox_id)

    def sandbox_ids(self) -> list[str]:
        return self.sandboxes.sandbox_ids()

    def close(self) -> None:
        self.sandboxes.close()


def split_id(sandbox_id: str) -> tuple[str, str]:
    """Return (local sandbox id, node id) of a cluster-wide sandbox id."""
    local, separator, node_id = sandbox_id.rpartition(SEPARATOR)
    if not separator or not local:
        raise ValueError(f"sandbox id {sandbox_id!r} has no '{SEPARATOR}<node id>' suffix; "
                         "it was not made by RayHosts")
    return local, node_id


class RayHosts:
    """One HostAgent per live node of the connected Ray cluster; picklable into Ray tasks.

    state_dir: host directory (on every node) under which each agent keeps its sandboxes.
    spec: the sandbox spec every agent creates sandboxes with.
    """

    def __init__(self, spec: SandboxSpec, state_dir: str) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.agents: dict[str, Any] = {}  # node id -> actor handle
        self.refresh()

    def refresh(self) -> list[str]:
        """Start agents on new nodes, forget dead ones; return the live node ids."""
        live = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        for node_id in list(self.agents):
            if node_id not in live:
                logger.info("Ray node %s is gone; its sandboxes are lost", node_id)
                del self.agents[node_id]
        agent_class = ray.remote(num_cpus=0)(HostAgent)
        for node_id in live:
            if node_id not in self.agents:
                strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
                self.agents[node_id] = agent_class.options(scheduling_strategy=strategy).remote(
                    self.state_dir, self.spec)
        return sorted(self.agents)

    def place(self, traj_id: str) -> str:
        """Return the node for a trajectory: the live node with the highest rendezvous hash."""
        if not self.agents:
            raise RuntimeError("no live Ray node has a sandbox agent; call refresh() after nodes join")
        return max(self.agents, key=lambda node_id: hashlib.sha256(f"{traj_id}/{node_id}".encode()).digest())

    def agent(self, node_id: str) -> Any | None:
        return self.agents.get(node_id)

    def provider(self, traj_id: str, journal_dir: str = REPLAY_JOURNAL_DIR) -> HostProvider:
        """Return a provider that creates the trajectory's sandboxes on its placed node."""
        return HostProvider(RoutedHost(self, self.place(traj_id)), journal_dir)

    def close(self) -> None:
        """Kill every sandbox on every live agent, then the agents."""
        for node_id, agent in list(self.agents.items()):
            try:
                ray.get(agent.close.remote())
                ray.kill(agent)
            except (RayActorError, ActorUnavailableError) as error:
                logger.warning("agent on node %s could not be closed: %s", node_id, error)
        self.agents.clear()


class RoutedHost:
    """SandboxHost methods over the cluster: new sandboxes go to `node_id`, calls to the owner."""

    def __init__(self, hosts: RayHosts, node_id: str) -> None:
        self.hosts = hosts
        self.node_id = node_id

    def _owner(self, sandbox_id: str) -> tuple[Any, str]:
        local, node_id = split_id(sandbox_id)
        agent = self.hosts.agent(node_id)
        if agent is None:
            raise LookupError(f"sandbox {sandbox_id}: node {node_id} has no live agent")
        return agent, local

    def _placed(self) -> Any:
        agent = self.hosts.agent(self.node_id)
        if agent is None:
            raise LookupError(f"node {self.node_id} has no live agent; place the trajectory again")
        return agent

    def create(self) -> str:
        return f"{ray.get(self._placed().create.remote())}{SEPARATOR}{self.node_id}"

    def alive(self, sandbox_id: str) -> bool:
        try:
            agent, local = self._owner(sandbox_id)
            return bool(ray.get(agent.alive.remote(local), timeout=PING_TIMEOUT_S))
        except (LookupError, RayActorError, ActorUnavailableError, ray.exceptions.GetTimeoutError):
            return False

    def exec(self, sandbox_id: str, argv: list[str], stdin: bytes, cwd: str | None,
             env: Mapping[str, str], timeout_s: float | None) -> ToolResult:
        agent, local = self._owner(sandbox_id)
        return ray.get(agent.exec.remote(local, argv, stdin, cwd, dict(env), timeout_s))

    def snapshot(self, sandbox_id: str) -> dict[str, Any] | None:
        agent, local = self._owner(sandbox_id)
        return ray.get(agent.snapshot.remote(local))

    def restore(self, snapshot: dict[str, Any]) -> str | None:
        # NOTE: the snapshot path must be readable on the placed node; across machines that
        # means a shared file system for the agents' state directories.
        local = ray.get(self._placed().restore.remote(snapshot))
        return f"{local}{SEPARATOR}{self.node_id}" if local is not None else None

    def kill(self, sandbox_id: str) -> None:
        agent, local = self._owner(sandbox_id)
        ray.get(agent.kill.remote(local))

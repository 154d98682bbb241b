"""Ray scale-out: sandboxes placed on the nodes of a local multi-node Ray cluster.

The cluster runs a head and two worker nodes as separate raylet processes on this
machine. A trajectory runs on one worker node, that node is removed, and the
trajectory resumes on another node through the shared log and a snapshot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the optional extra 'ray' is not installed: pip install 'dsv4[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from dsv4.sandbox import Host, SandboxSpec  # noqa: E402
from dsv4.sandbox.cluster.ray_backend import RayHosts, split_id  # noqa: E402
from dsv4.sandbox.residue import find_residue  # noqa: E402
from dsv4.sandbox.trajlog import ToolRequest, TrajectoryLog, TrajectorySession  # noqa: E402

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
STEPS = 16


def plan() -> list[tuple[ToolRequest, bool]]:
    steps = []
    for step in range(STEPS):
        if step % 3 == 0:
            steps.append((ToolRequest(command=f"echo {step} >> /work/counter && wc -l < /work/counter"), False))
        else:
            steps.append((ToolRequest(command=f"echo {step}; wc -l < /work/counter"), True))
    return steps


def run_plan(log_root: str, traj: str, hosts: RayHosts, last_step: int):
    """Run steps 0..last_step of the plan as a rollout worker; snapshots every 5 steps."""
    session = TrajectorySession.open(TrajectoryLog(log_root), "run", traj, hosts.provider(traj), snapshot_every=5)
    results = [session.call(s, 0, request, idempotent=idempotent)
               for s, (request, idempotent) in enumerate(plan()[:last_step + 1])]
    session.close()
    return ([(r.exit_code, r.stdout, r.replayed) for r in results], session.env.sandbox_id,
            ray.get_runtime_context().get_node_id())


@pytest.fixture(scope="module")
def cluster():
    root = Path(__file__).resolve().parents[2]
    # Ray worker processes inherit the raylets' environment, so they can import dsv4 and this module.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "src"), str(Path(__file__).parent),
                                                           previous) if p)
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    workers = [cluster.add_node(**NODE_ARGS) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    state_dir = tempfile.mkdtemp(prefix="dsv4-sbx-ray-", dir="/tmp")
    os.chmod(state_dir, 0o755)
    yield cluster, workers, state_dir
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(state_dir, ignore_errors=True)
    if previous is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = previous


def on_node(node_id: str):
    return ray.remote(num_cpus=0)(run_plan).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))


def test_resume_on_another_node(cluster, tmp_path):
    ray_cluster, workers, state_dir = cluster
    hosts = RayHosts(SandboxSpec(layer="container", memory_mb=256), state_dir)
    assert len(hosts.refresh()) == 3
    worker_ids = {node.node_id for node in workers}
    traj = next(f"traj{i}" for i in range(100) if hosts.place(f"traj{i}") in worker_ids)
    first_node = hosts.place(traj)
    log_root = str(tmp_path / "log")

    results, sandbox_id, ran_on = ray.get(on_node(first_node).remote(log_root, traj, hosts, 9))
    assert ran_on == first_node
    assert split_id(sandbox_id)[1] == first_node
    assert [r[2] for r in results] == [False] * 10
    assert results[9] == (0, b"4\n", False)

    ray_cluster.remove_node(next(node for node in workers if node.node_id == first_node))
    ray_cluster.wait_for_nodes()
    hosts.refresh()
    assert first_node not in hosts.agents
    second_node = hosts.place(traj)
    assert second_node != first_node

    results, new_sandbox, ran_on = ray.get(on_node(second_node).remote(log_root, traj, hosts, STEPS - 1))
    assert ran_on == second_node
    assert split_id(new_sandbox)[1] == second_node
    assert [r[2] for r in results] == [True] * 10 + [False] * (STEPS - 10)
    assert results[12] == (0, b"5\n", False)  # steps 0, 3, 6, 9 came back with the snapshot of step 9
    counter = hosts.agent(second_node).exec.remote(split_id(new_sandbox)[0], ["cat", "/work/counter"], b"",
                                                   None, {}, 10.0)
    assert ray.get(counter).stdout.split() == [str(s).encode() for s in range(0, STEPS, 3)]
    hosts.close()

    # The removed node's agent died with its sandbox; a restarted host on its state directory reaps it.
    dead_dir = os.path.join(state_dir, first_node[:16])
    Host(dead_dir, reap_interval_s=3600).close()
    assert_no_residue(split_id(sandbox_id)[0], dead_dir)
    assert_no_residue(split_id(new_sandbox)[0], os.path.join(state_dir, second_node[:16]))


def assert_no_residue(sandbox_id: str, state_dir: str, wait_s: float = 5.0) -> None:
    """Assert nothing of the sandbox is left, allowing `wait_s` for killed processes to be reaped."""
    deadline = time.monotonic() + wait_s
    leftovers = find_residue(sandbox_id, state_dir)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = find_residue(sandbox_id, state_dir)
    assert leftovers == [], f"sandbox {sandbox_id} left host resources behind: {leftovers}"

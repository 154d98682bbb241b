"""Benchmark the sandbox layers: cold start, creates per second, concurrent idle sandboxes.

Run as root from the repository root::

    python benchmarks/sandbox_layers.py                  # function and container rows
    python benchmarks/sandbox_layers.py --layers container --idle 300

Prints a table and rewrites this benchmark's section of ``docs/benchmarks.md`` (between the
``sandbox_layers`` markers). To add a layer, add a ``LayerBench`` entry to ``BENCHES``.

* cold start: ``Sandbox.create`` until the result of a first ``true`` command (p50, p99);
* creates/s: create + first command + kill, two client threads, over a fixed duration;
* idle density: sandboxes kept alive at once (each with an open bash session where the layer
  has sessions), memory per sandbox from the drop of MemAvailable, and teardown time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dsv4.sandbox import Host, Sandbox  # noqa: E402

MARK_BEGIN = "<!-- sandbox_layers:begin -->"
MARK_END = "<!-- sandbox_layers:end -->"


@dataclass
class LayerBench:
    layer: str
    spec: dict[str, Any] = field(default_factory=dict)   # extra Sandbox.create arguments
    cold_runs: int = 20
    idle_count: int = 100
    idle_session: bool = True      # keep a bash session open in each idle sandbox
    target_cold_ms: float = 0.0    # target p50 create-to-first-result, 0 when none
    warmup: int = 0                # untimed creates first (VM layers build their template)


BENCHES = {
    "function": LayerBench("function", {"memory_mb": 64}, idle_session=False,
                           target_cold_ms=5.0),
    "container": LayerBench("container", {"memory_mb": 64}, target_cold_ms=25.0),
    "container-runsc": LayerBench("container", {"memory_mb": 128,
                                                "options": {"runtime": "runsc"}},
                                  cold_runs=5, idle_count=10, target_cold_ms=300.0),
    # VM layers under TCG: "microvm"/"vm" restore a cached template snapshot, the "-cold" rows
    # boot the kernel every time. Counts stay small because each guest costs ~170 MiB and a
    # TCG boot takes seconds on a shared 2-core host.
    "microvm": LayerBench("microvm", {"memory_mb": 160}, cold_runs=5, idle_count=6,
                          idle_session=False, target_cold_ms=400.0, warmup=1),
    "microvm-cold": LayerBench("microvm", {"memory_mb": 160, "options": {"boot": "cold"}},
                               cold_runs=3, idle_count=1, idle_session=False,
                               target_cold_ms=3000.0),
    "vm": LayerBench("vm", {"memory_mb": 160}, cold_runs=5, idle_count=4, idle_session=False,
                     warmup=1),
    "vm-cold": LayerBench("vm", {"memory_mb": 160, "options": {"boot": "cold"}}, cold_runs=3,
                          idle_count=1, idle_session=False, target_cold_ms=5000.0),
}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def cold_start_ms(host: Host, bench: LayerBench) -> tuple[float, float]:
    for _ in range(bench.warmup):
        Sandbox.create(layer=bench.layer, host=host, **bench.spec).kill()
    samples = []
    for _ in range(bench.cold_runs):
        start = time.perf_counter()
        sandbox = Sandbox.create(layer=bench.layer, host=host, **bench.spec)
        sandbox.exec(["true"])
        samples.append((time.perf_counter() - start) * 1e3)
        sandbox.kill()
    return statistics.median(samples), _percentile(samples, 0.99)


def creates_per_second(host: Host, bench: LayerBench, duration_s: float,
                       threads: int = 2) -> float:
    count = [0] * threads
    stop_at = time.monotonic() + duration_s

    def worker(index: int) -> None:
        while time.monotonic() < stop_at:
            sandbox = Sandbox.create(layer=bench.layer, host=host, **bench.spec)
            sandbox.exec(["true"])
            sandbox.kill()
            count[index] += 1

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return sum(count) / (time.monotonic() - started)


def idle_density(host: Host, bench: LayerBench, count: int) -> tuple[int, float, float, float]:
    """Return (alive, MiB per sandbox, create seconds, teardown seconds).

    Memory is what each layer charges to its sandbox (``stats().memory_bytes``: the cgroup
    charge, or the QEMU RSS), because MemAvailable moves with everything else on a shared host.
    """
    sandboxes, sessions = [], []
    start = time.monotonic()
    for _ in range(count):
        sandbox = Sandbox.create(layer=bench.layer, host=host, **bench.spec)
        sandboxes.append(sandbox)
        if bench.idle_session:
            session = sandbox.session("bash")
            session.run("true")
            sessions.append(session)
    created_s = time.monotonic() - start
    time.sleep(1.0)
    alive = sum(1 for sandbox in sandboxes if sandbox.is_running())
    per_sandbox = statistics.mean(s.stats().memory_bytes for s in sandboxes) / (1 << 20)
    start = time.monotonic()
    for sandbox in sandboxes:
        sandbox.kill()
    return alive, per_sandbox, created_s, time.monotonic() - start


def write_section(path: str, section: str) -> None:
    text = ""
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
    block = f"{MARK_BEGIN}\n{section}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "# Benchmarks\n\n") + block + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default=",".join(BENCHES),
                        help=f"comma-separated layers among {sorted(BENCHES)}")
    parser.add_argument("--duration-s", type=float, default=5.0,
                        help="seconds per creates-per-second measurement")
    parser.add_argument("--idle", type=int, default=None,
                        help="idle sandboxes to hold at once (default: per layer)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..",
                                                         "docs", "benchmarks.md"),
                        help="markdown file whose sandbox_layers section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    state_dir = tempfile.mkdtemp(prefix="dsv4-sbx-bench-", dir="/tmp")
    os.chmod(state_dir, 0o755)
    # Admission would stop the density run at the CPU budget (8 x cores at 1 core each), so
    # the benchmark host budgets enough for every idle sandbox.
    host = Host(state_dir, reap_interval_s=3600, cpu_budget=1e6, memory_budget_mb=1 << 30)
    rows = []
    try:
        for name in args.layers.split(","):
            bench = BENCHES[name]
            p50, p99 = cold_start_ms(host, bench)
            rate = creates_per_second(host, bench, args.duration_s)
            alive, per_mb, created_s, teardown_s = idle_density(
                host, bench, args.idle or bench.idle_count)
            target = f"≤ {bench.target_cold_ms:g}" if bench.target_cold_ms else "-"
            rows.append(f"| {name} | {p50:.1f} | {p99:.1f} | {target} | {rate:.3g} | {alive} | "
                        f"{per_mb:.2f} | {created_s:.2f} | {teardown_s:.2f} |")
            print(rows[-1], flush=True)
    finally:
        host.close()
        shutil.rmtree(state_dir, ignore_errors=True)

    header = (
        "## Sandbox layers\n\n"
        f"`python benchmarks/sandbox_layers.py` on {platform.node()}: {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}, 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (other work on a shared host inflates every row). "
        "Cold start is create until the first `true` result; "
        "creates/s is create + first command + kill with two client threads; idle sandboxes "
        "each hold an open bash session where the layer has sessions, and their memory is the "
        "mean of `stats().memory_bytes` (cgroup charge or QEMU RSS).\n\n"
        "| layer | cold start p50 (ms) | p99 (ms) | target p50 (ms) | creates/s "
        "| idle alive | MiB per idle sandbox | create all (s) | kill all (s) |\n"
        "|---|---|---|---|---|---|---|---|---|")
    section = header + "\n" + "\n".join(rows)
    print(section)
    if not args.no_write:
        write_section(os.path.abspath(args.output), section)


if __name__ == "__main__":
    main()

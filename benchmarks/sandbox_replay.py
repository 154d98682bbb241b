"""Benchmark the trajectory log: lookup, fast-forward, append overhead, open/index, resume.

Run from the repository root (the container resume row needs root and bubblewrap)::

    python benchmarks/sandbox_replay.py
    python benchmarks/sandbox_replay.py --records 200000 --steps 20000   # quicker

Prints a table and rewrites this benchmark's section of ``docs/benchmarks.md`` (between
the ``sandbox_replay`` markers).

* lookup: one replayed ``TrajectorySession.call`` (request hash + index hit + decode), p50/p99;
* fast-forward: replayed calls per second through a long logged trajectory;
* append: a durable INTENT (write + fdatasync) and a group-committed RESULT, per record;
* open/index: scan + CRC check + JSON decode + grouping of every record in the log;
* resume: open a logged 50-step trajectory and replay it. With a container, the second
  row also restores its file-system snapshot after the sandbox is gone and runs the
  first live call.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from dsv4.sandbox.trajlog import ToolRequest, ToolResult, TrajectoryLog, TrajectorySession  # noqa: E402
from dsv4.sandbox.trajlog.framing import RecordType  # noqa: E402
from dsv4.sandbox.trajlog.hashing import idem_key, request_hash  # noqa: E402
from dsv4.sandbox.trajlog.state import CallEntry  # noqa: E402

MARK_BEGIN = "<!-- sandbox_replay:begin -->"
MARK_END = "<!-- sandbox_replay:end -->"


class NoSandbox:
    """Provider for runs whose calls all replay: creating a sandbox is a bug here."""

    def create(self):
        raise AssertionError("a replayed trajectory needed a sandbox")

    reattach = restore = create


def log_trajectory(root: Path, traj: str, steps: int) -> list[ToolRequest]:
    """Write a finished trajectory of `steps` calls straight to the log (no sandbox)."""
    log = TrajectoryLog(root)
    session = TrajectorySession(log, "bench", traj, NoSandbox())
    session._take_lease({}, parent=None)
    requests = [ToolRequest(command=f"python -c 'print({step})'", cwd="/work") for step in range(steps)]
    for step, request in enumerate(requests):
        req_hash = request_hash(request)
        key = idem_key("bench", traj, step, 0, req_hash)
        payload = session._append(RecordType.INTENT, {"step": step, "call": 0, "request": request.to_record(),
                                                      "request_hash": req_hash, "idem_key": key,
                                                      "idempotent": step % 3 != 0, "sandbox_id": "none"})
        session._record_result(CallEntry(step, 0, payload), ToolResult(0, f"{step}\n".encode() * 8), 0.01,
                               recovered=False)
    session.end()
    log.close()
    return requests


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_lookup_and_fast_forward(root: Path, steps: int) -> tuple[float, float, float]:
    requests = log_trajectory(root, "ff", steps)
    session = TrajectorySession.open(TrajectoryLog(root), "bench", "ff", NoSandbox())
    timings = []
    start = time.perf_counter()
    for step, request in enumerate(requests):
        began = time.perf_counter()
        result = session.call(step, 0, request, idempotent=step % 3 != 0)
        timings.append(time.perf_counter() - began)
        assert result.replayed
    elapsed = time.perf_counter() - start
    return percentile(timings, 0.5) * 1e3, percentile(timings, 0.99) * 1e3, steps / elapsed


def bench_append(root: Path, count: int) -> tuple[float, float]:
    log = TrajectoryLog(root, group_records=32, group_ms=1e9)
    payload = {"run": "bench", "traj": "append", "epoch": 1, "request": {"command": "x" * 600}}
    start = time.perf_counter()
    for seq in range(count):
        log.writer.append(RecordType.INTENT, {**payload, "seq": seq}, durable=True)
    durable_ms = (time.perf_counter() - start) / count * 1e3
    start = time.perf_counter()
    for seq in range(count, 2 * count):
        log.writer.append(RecordType.RESULT, {**payload, "seq": seq})
    log.writer.sync()
    grouped_ms = (time.perf_counter() - start) / count * 1e3
    log.close()
    return durable_ms, grouped_ms


def bench_open(root: Path, records: int) -> tuple[float, float]:
    log = TrajectoryLog(root, group_records=4096, group_ms=1e9, segment_bytes=256 * 1024 * 1024)
    body = {"request": {"command": "y" * 700}}
    for seq in range(records):
        log.writer.append(RecordType.RESULT, {"run": "bench", "traj": f"t{seq % 1000}", "epoch": 1, "seq": seq, **body})
    log.close()
    start = time.perf_counter()
    grouped = TrajectoryLog(root).scan_all()
    elapsed = time.perf_counter() - start
    assert sum(len(frames) for frames in grouped.values()) == records
    return elapsed, elapsed / records * 1e6


def bench_resume_log_only(root: Path) -> float:
    requests = log_trajectory(root, "resume", 50)
    start = time.perf_counter()
    session = TrajectorySession.open(TrajectoryLog(root), "bench", "resume", NoSandbox())
    for step, request in enumerate(requests):
        session.call(step, 0, request, idempotent=step % 3 != 0)
    return (time.perf_counter() - start) * 1e3


def bench_resume_container(root: Path) -> tuple[float | None, str]:
    """Resume a 50-step trajectory whose container is gone: snapshot restore + first live call."""
    try:
        from dsv4.sandbox import Host, SandboxSpec
        from dsv4.sandbox.cluster.local import HostProvider, SandboxHost
    except ImportError as error:
        return None, f"container layer not importable: {error}"
    state_dir = tempfile.mkdtemp(prefix="dsv4-sbx-bench-", dir="/tmp")
    os.chmod(state_dir, 0o755)
    host = SandboxHost(Host(state_dir, reap_interval_s=3600), SandboxSpec(layer="container", memory_mb=256))
    try:
        requests = [ToolRequest(command=f"echo {step} >> /work/log; wc -l < /work/log") for step in range(51)]
        session = TrajectorySession.open(TrajectoryLog(root), "bench", "ctr", HostProvider(host))
        for step, request in enumerate(requests[:50]):
            session.call(step, 0, request, idempotent=False)
        session.snapshot(49)
        session.close()
        host.kill(session.env.sandbox_id)
        start = time.perf_counter()
        resumed = TrajectorySession.open(TrajectoryLog(root), "bench", "ctr", HostProvider(host))
        for step, request in enumerate(requests[:50]):
            resumed.call(step, 0, request, idempotent=False)
        result = resumed.call(50, 0, requests[50], idempotent=False)
        elapsed = (time.perf_counter() - start) * 1e3
        assert result.stdout == b"51\n", result
        return elapsed, "container fs snapshot restore + first live call"
    except Exception as error:  # noqa: BLE001 - a host without the container layer still gets the other rows
        return None, f"container resume failed: {error}"
    finally:
        host.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def write_section(path: str, section: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the text between `begin` and `end` in `path`, or append the marked section."""
    text = Path(path).read_text() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10000, help="logged calls replayed for lookup and fast-forward")
    parser.add_argument("--records", type=int, default=1000000, help="records written and scanned for open/index")
    parser.add_argument("--appends", type=int, default=2000, help="records per append measurement")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"),
                        help="markdown file whose sandbox_replay section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-container", action="store_true", help="skip the container resume row")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dsv4-replay-bench-"))
    try:
        p50, p99, rate = bench_lookup_and_fast_forward(work / "ff", args.steps)
        durable_ms, grouped_ms = bench_append(work / "append", args.appends)
        open_s, per_record_us = bench_open(work / "open", args.records)
        resume_ms = bench_resume_log_only(work / "resume")
        if args.no_container:
            container_ms, container_note = None, "skipped (--no-container)"
        else:
            container_ms, container_note = bench_resume_container(work / "ctr")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("replayed call lookup, p50 / p99", f"{p50:.3f} / {p99:.3f} ms", "p99 ≤ 1 ms"),
        (f"fast-forward ({args.steps} logged calls)", f"{rate:,.0f} steps/s", "≥ 10,000 steps/s"),
        ("durable INTENT append (write + fdatasync)", f"{durable_ms:.3f} ms", "≤ 0.2 ms"),
        ("group-committed RESULT append (32 per sync)", f"{grouped_ms:.4f} ms", "≤ 0.05 ms"),
        (f"open/index {args.records:,} records", f"{open_s:.2f} s ({per_record_us:.1f} µs/record"
         + (")" if args.records == 1_000_000 else f"; 1 M estimated from this rate: {per_record_us:.1f} s)"),
         "1 M records ≤ 10 s"),
        ("resume 50 steps, no sandbox restore", f"{resume_ms:.1f} ms", "≤ 50 ms"),
        ("resume 50 steps, " + container_note,
         f"{container_ms:.1f} ms" if container_ms is not None else "not measured", "≤ 200 ms"),
    ]
    table = ["| measurement | result | target |", "|---|---|---|"]
    table += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    section = "\n".join([
        "## Trajectory log (replay)",
        "",
        f"`python benchmarks/sandbox_replay.py` on {platform.node() or 'this host'} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}, log under {tempfile.gettempdir()}, "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end; other work on the host inflates every row).",
        "",
        *table,
    ])
    print(section)
    if not args.no_write:
        write_section(args.output, section)


if __name__ == "__main__":
    main()

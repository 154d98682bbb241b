"""B4: `dsv4 serve` on the tiny model under N concurrent streaming clients on loopback.

Starts the server as a subprocess, then for each concurrency level runs that many clients that
stream completions back to back for a bounded time. Prints a table (aggregate and per-stream
tokens/s, time to first token, errors, server RSS before and after) and writes the section
"B4" of docs/benchmarks.md.

    .venv/bin/python benchmarks/server_b4.py --levels 1,8,32,64 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_docs import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client_loop(base: str, deadline: float, max_tokens: int, seed: int, stats: dict) -> None:
    body = {"model": "dsv4-tiny", "messages": [{"role": "user", "content": f"Tell me about topic {seed}"}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "seed": seed, "thinking": {"type": "disabled"}}
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            started = time.monotonic()
            first = None
            try:
                async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        stats["errors"] += 1
                        await response.aread()
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.monotonic() - started
                        if chunk.get("usage"):
                            stats["tokens"] += chunk["usage"]["completion_tokens"]
                            stats["per_stream"].append(chunk["usage"]["completion_tokens"]
                                                       / (time.monotonic() - started))
            except httpx.HTTPError:
                stats["errors"] += 1
                continue
            if first is not None:
                stats["ttft"].append(first)


async def run_level(base: str, clients: int, seconds: float, max_tokens: int) -> dict:
    stats = {"tokens": 0, "errors": 0, "ttft": [], "per_stream": []}
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(client_loop(base, deadline, max_tokens, seed, stats) for seed in range(clients)))
    stats["elapsed"] = time.monotonic() - started
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,8,32,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion length per request")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "dsv4", "serve", "--model", "tiny", "--port", str(port),
               "--max-running", str(max(levels)), "--max-queued", str(max(levels))]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("server did not start within 600 s")
        # One warm-up request so that first-call costs are not measured.
        asyncio.run(run_level(base, 1, 0.1, 4))
        baseline = rss_mib(server.pid)
        rows = []
        for clients in levels:
            stats = asyncio.run(run_level(base, clients, args.seconds, args.max_tokens))
            rows.append({
                "clients": clients,
                "tok_s": stats["tokens"] / stats["elapsed"],
                "per_stream": statistics.median(stats["per_stream"]) if stats["per_stream"] else 0.0,
                "ttft_p50": statistics.median(stats["ttft"]) if stats["ttft"] else float("nan"),
                "errors": stats["errors"],
                "rss": rss_mib(server.pid),
            })
        time.sleep(2)
        after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    single = rows[0]["tok_s"] if rows and rows[0]["clients"] == 1 else None
    lines = ["| clients | aggregate tok/s | speedup vs 1 | per-stream tok/s (median) | TTFT p50 s | errors | server RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = f"{row['tok_s'] / single:.2f}x" if single else "n/a"
        lines.append(f"| {row['clients']} | {row['tok_s']:.1f} | {speedup} | {row['per_stream']:.1f} | "
                     f"{row['ttft_p50']:.2f} | {row['errors']} | {row['rss']:.0f} |")
    table = "\n".join(lines)
    summary = (f"Server RSS: {baseline:.0f} MiB after warm-up, {after:.0f} MiB after the last level "
               f"({(after - baseline) / baseline * 100:+.1f}%).")
    print(table)
    print(summary)
    if not args.no_docs:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        body = (f"`dsv4 serve --model tiny` with `--max-running {max(levels)}`; clients stream "
                f"{args.max_tokens}-token completions (thinking disabled) back to back for {args.seconds:.0f} s "
                f"per level, on loopback.\n\nMachine: {machine}. Date: {time.strftime('%Y-%m-%d')}. "
                f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/server_b4.py'] + sys.argv[1:])}`.\n\n"
                f"{table}\n\n{summary}\n")
        write_section(ROOT / "docs" / "benchmarks.md", "B4. Server under load (tiny model)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

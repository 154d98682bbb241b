"""Long context on the ``tiny`` model: prefill time per chunk as the context grows, decode speed
at the end against decode at 4K, and peak RSS.

The prefill time of 2^20 tokens is extrapolated from a straight-line fit of chunk time against
position, for runs shorter than that.

    python benchmarks/engine_long.py --context 262144 --threads 2

prints a table and writes the section "Long context (tiny model)" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_docs import write_section  # noqa: E402
from engine_b2 import peak_rss_gib  # noqa: E402

TARGET = 1 << 20


def run(engine, prompt: list[int], decode: int, chunk: int, progress: bool) -> dict:
    """Prefill ``prompt`` chunk by chunk, then decode ``decode`` greedy tokens."""
    from dsv4.engine.sampler import SamplingParams

    engine.add_request("long", prompt, SamplingParams(max_tokens=decode + 1, ignore_eos=True))
    chunk_times: list[float] = []  # seconds of each prefill step, one chunk per step
    started = time.perf_counter()
    while True:
        before = time.perf_counter()
        outputs = engine.step()
        chunk_times.append(time.perf_counter() - before)
        if any(o.new_token_ids for o in outputs):
            break
        if progress and len(chunk_times) % 32 == 0:
            rate = len(chunk_times) * chunk / (time.perf_counter() - started)
            print(f"  {len(chunk_times)} chunks, {rate:.0f} tok/s", file=sys.stderr, flush=True)
    prefill_s = time.perf_counter() - started
    first = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    decode_tok_s = decode / (time.perf_counter() - first)
    return {"prefill_s": prefill_s, "decode_tok_s": decode_tok_s, "chunk_times": chunk_times}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a, b of y = a + b x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=262144, help="prompt tokens of the long run")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk in tokens")
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens decoded after each prefill")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    from dsv4.engine.engine import SMALL_MODEL_CACHE_BYTES, EngineConfig, LLMEngine
    from dsv4.engine.scheduler import SchedulerConfig
    from dsv4.model.loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model("tiny", numerics="plain")
    scheduler = SchedulerConfig(max_batched_tokens=args.chunk, prefill_chunk=args.chunk)
    config = EngineConfig(scheduler=scheduler, upcast_weights=True, dequantized_cache_bytes=SMALL_MODEL_CACHE_BYTES)
    engine = LLMEngine(model, config)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    short = run(engine, torch.randint(0, vocab, (4096,), generator=generator).tolist(), args.decode, args.chunk, False)
    long = run(engine, torch.randint(0, vocab, (args.context,), generator=generator).tolist(), args.decode, args.chunk, True)

    # Chunk k starts at position k * chunk; fit the second half, where the context-bound part dominates.
    points = [(k * args.chunk, seconds) for k, seconds in enumerate(long["chunk_times"])]
    fixed, per_token = fit_line(points[len(points) // 2:])
    chunks = -(-TARGET // args.chunk)
    estimate_s = sum(fixed + per_token * k * args.chunk for k in range(chunks))
    rows = [
        ("prefill of the long prompt", f"{args.context:,} tokens in {long['prefill_s'] / 60:.1f} min "
                                       f"({args.context / long['prefill_s']:.0f} tok/s)"),
        ("decode at 4,096 tokens", f"{short['decode_tok_s']:.1f} tok/s"),
        (f"decode at {args.context:,} tokens", f"{long['decode_tok_s']:.1f} tok/s "
                                               f"({long['decode_tok_s'] / short['decode_tok_s']:.2f}x of 4K)"),
        ("peak RSS of the process", f"{peak_rss_gib():.2f} GiB"),
        ("chunk time fit (second half)", f"{fixed:.3f} s + {per_token * 1e6:.2f} us per token of context"),
        ("prefill of 2^20 tokens (extrapolated)", f"{estimate_s / 60:.0f} min"),
    ]
    table = "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    print(table)
    if not args.no_docs:
        command = "python benchmarks/engine_long.py " + " ".join(sys.argv[1:])
        body = [f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, shared with other "
                f"jobs; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
                f"Command: `{command.strip()}`. Model `tiny` (random weights, FP8/FP4 as released, plain "
                f"numerics in float32), chunk {args.chunk}, {args.decode} greedy tokens decoded after a "
                f"4,096-token prompt and after the long one, in one process.", "", table]
        write_section(ROOT / "docs" / "benchmarks.md", "Long context (tiny model)", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())

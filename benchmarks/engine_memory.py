"""Peak memory of chunked prefill: does activation memory stay bounded by the chunk?

Prefills one long prompt on the B2 model in chunks and reports the growth of peak RSS during
prefill next to two bounds. The first is the cache bytes the engine reserved (the formula). The
second is the indexer's largest score block: chunk x visible entries x index heads x 4 B,
capped by the model's element budget. Each context runs in its own process.

    python benchmarks/engine_memory.py --contexts 32768,131072 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def worker(checkpoint: str, context: int, chunk: int) -> dict:
    import torch

    from dsv4.engine.engine import EngineConfig, LLMEngine
    from dsv4.engine.sampler import SamplingParams
    from dsv4.engine.scheduler import SchedulerConfig
    from dsv4.model.indexer import _SCORE_BUDGET
    from dsv4.model.loading import load_model

    model = load_model(checkpoint, numerics="plain")
    scheduler = SchedulerConfig(max_batched_tokens=chunk, prefill_chunk=chunk)
    engine = LLMEngine(model, EngineConfig(scheduler=scheduler, upcast_weights=True))
    prompt = torch.randint(0, model.config.vocab_size, (context,)).tolist()
    baseline = rss_bytes()
    engine.add_request("m", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - started
    reserved = sum(engine.cache.bytes_for(context + 1).values())
    c = model.config
    score_block = min(chunk * (context // 4) * c.index_n_heads, _SCORE_BUDGET) * 4
    return {"context": context, "chunk": chunk, "prefill_s": elapsed, "rss_growth": rss_bytes() - baseline,
            "cache_formula": reserved, "score_block": score_block}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="32768,131072", help="comma-separated context lengths")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk in tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--checkpoint", default=None, help="reuse a B2 checkpoint directory")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        checkpoint, context, chunk = args.worker
        print(json.dumps(worker(checkpoint, int(context), int(chunk))))
        return 0

    from dsv4.model.writer import write_random_checkpoint
    from engine_b2 import b2_config

    checkpoint = args.checkpoint
    if not checkpoint:
        checkpoint = tempfile.mkdtemp(prefix="dsv4-b2-")
        write_random_checkpoint(b2_config(), checkpoint, seed=0, progress=False)
    print("| context | chunk | prefill s | RSS growth MiB | cache formula MiB | score block MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for context in (int(c) for c in args.contexts.split(",") if c):
        command = [sys.executable, __file__, "--threads", str(args.threads), "--worker", checkpoint,
                   str(context), str(args.chunk)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        mib = 2 ** 20
        print(f"| {r['context']:,} | {r['chunk']} | {r['prefill_s']:.0f} | {r['rss_growth'] / mib:.1f} | "
              f"{r['cache_formula'] / mib:.1f} | {r['score_block'] / mib:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""B3: one V4-Flash-sized layer decoding on the CPU against the memory-bandwidth roofline.

Builds one CSA layer of the Flash config with random values in the official layout: hidden
4096, 256 FP4 routed experts, FP8 attention weights. It prefills a short context, then decodes
one token at a time. The roofline time per token is the bytes the layer must read (attention and
compressor weights, the router, 6 routed experts and the shared expert, the KV it attends to)
divided by the copy bandwidth measured in the same run.

    python benchmarks/engine_b3.py --context 512 --tokens 8

prints a table and writes the section "B3" of docs/benchmarks.md.
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

import torch  # noqa: E402

from bench_docs import write_section  # noqa: E402


NOTE = ("The gap to the roofline is the model's weight handling, not memory traffic: every "
        "matmul dequantizes its FP8 or FP4 weight to float32 first, which for this layer is about "
        "305 million values per decoded token (attention and compressor weights, 6 routed experts, "
        "the shared expert). Fused low-precision matmul kernels or cached dequantized weights "
        "would be needed to approach the bandwidth bound.")


def copy_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Median bytes/s of a large tensor copy (read + write counted once each)."""
    source = torch.ones(size_bytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
    times.sort()
    return 2 * size_bytes / times[len(times) // 2]


def build_layer(config, layer_index: int):
    from dsv4.model.layout import layer_tensors
    from dsv4.model.linear import Numerics
    from dsv4.model.loading import _assign
    from dsv4.model.random_weights import random_tensors
    from dsv4.model.transformer import Block

    ratio = config.layer_ratios[layer_index]
    with torch.device("meta"):
        block = Block(config, ratio, hashed=layer_index < config.num_hash_layers, numerics=Numerics("plain"))
    specs = layer_tensors(config, layer_index)
    prefix = f"layers.{layer_index}."
    made: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if name.endswith(".scale"):
            continue
        scale_spec = specs.get(name.removesuffix(".weight") + ".scale")
        made.update(random_tensors(name, spec, scale_spec, 0, config))
    for name, tensor in made.items():
        _assign(block, name.removeprefix(prefix), tensor)
    read_bytes = layer_read_bytes(made, prefix, config)
    return block.eval(), read_bytes


def layer_read_bytes(tensors: dict[str, torch.Tensor], prefix: str, config) -> int:
    """Weight bytes one decode token reads: everything but the routed experts, plus the
    ``num_experts_per_tok`` routed experts it uses."""
    shared, expert_bytes = 0, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if f"{prefix}ffn.experts." in name:
            expert_bytes += size
        else:
            shared += size
    return shared + expert_bytes * config.num_experts_per_tok // config.n_routed_experts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=512, help="tokens prefilled before decoding")
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dsv4.config import load_preset
    from dsv4.model.attention import Segment
    from dsv4.model.kv_state import LayerState

    config = load_preset("flash")
    layer_index = config.layer_ratios.index(4)
    bandwidth = copy_bandwidth()
    block, weight_bytes = build_layer(config, layer_index)
    state = LayerState(4, config.sliding_window, config.head_dim, config.index_head_dim, torch.float32, "cpu")
    hc, d = config.hc_mult, config.hidden_size
    generator = torch.Generator().manual_seed(0)

    def run(start: int, length: int) -> None:
        streams = torch.randn(length, hc, d, generator=generator)  # [n, hc, d] block input
        token_ids = torch.randint(0, config.vocab_size, (length,), generator=generator)
        positions = torch.arange(start, start + length)
        block(streams, token_ids, positions, [Segment(0, length, start, state)])

    with torch.inference_mode():
        for start in range(0, args.context, 256):
            run(start, min(256, args.context - start))
        run(args.context, 1)  # warm-up step
        times = []
        for step in range(args.tokens):
            started = time.perf_counter()
            run(args.context + 1 + step, 1)
            times.append(time.perf_counter() - started)
    times.sort()
    per_token = times[len(times) // 2]
    # KV read per token: the window ring and the CSA entries plus index keys (float32 here).
    kv_bytes = (state.window.numel() + state.compressed.length * config.head_dim
                + state.index_keys.length * config.index_head_dim) * 4
    roofline = (weight_bytes + kv_bytes) / bandwidth
    rows = [("bytes read per token (weights + KV)", f"{(weight_bytes + kv_bytes) / 2**20:.1f} MiB"),
            ("measured copy bandwidth", f"{bandwidth / 1e9:.2f} GB/s"),
            ("roofline time per token", f"{1000 * roofline:.1f} ms"),
            ("measured time per token (median)", f"{1000 * per_token:.1f} ms"),
            ("fraction of roofline", f"{100 * roofline / per_token:.1f}%"),
            ("whole-model estimate (43 such layers, weights only)",
             f"{1 / (43 * per_token):.3f} tok/s (an extrapolation, not a measurement)")]
    table = "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    print(table)
    if not args.no_docs:
        command = "python benchmarks/engine_b3.py " + " ".join(sys.argv[1:])
        body = (f"Machine: {platform.machine()}, torch threads {args.threads}, shared with other jobs; "
                f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\nCommand: `{command.strip()}`. One "
                f"CSA layer of V4-Flash (layer {layer_index}), random weights in the released formats, "
                f"plain numerics in float32, {args.context} tokens of context, median of {args.tokens} "
                f"decode steps.\n\n{table}\n\n{NOTE}")
        write_section(ROOT / "docs" / "benchmarks.md", "B3. One V4-Flash layer against the memory roofline", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

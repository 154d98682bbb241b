"""``dsv4 kv``: KV cache bytes of a config at a context length (no torch).

Per layer kind: bytes added per token, fixed bytes per sequence (window ring + compressor
pending rows) and totals, in bf16 and in the deployment format (FP8 non-rope dims with UE8M0
scales and bf16 rope dims per KV entry, FP4 index keys with UE8M0 scales, the window ring
stored like KV entries). Baselines at the same context:

* GQA-8: 8 KV heads x 128 dims, K and V in bf16, the same number of layers (4096 B per token
  and layer);
* DeepSeek-V3.2: 61 layers x (656 B FP8 MLA entry + 132 B FP8 indexer key) per token. These
  per-entry sizes are an assumption about V3.2's FP8 cache that reproduces its published
  ~50 GB at 2^20 tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dsv4.config import ModelConfig

from .cache_manager import (deployment_format, entries_at, float_format, layer_costs,
                            pending_bytes)

GQA8_BYTES_PER_TOKEN_LAYER = 8 * 128 * 2 * 2  # heads x dims x (K, V) x bf16
V32_LAYERS = 61
V32_BYTES_PER_TOKEN_LAYER = 656 + 132


@dataclass
class KindRow:
    kind: str
    layers: int
    per_token_bf16: float  # asymptotic bytes per token, all layers of this kind
    per_token_deployment: float
    fixed_bf16: int  # window rings + pending rows, all layers of this kind
    fixed_deployment: int
    total_bf16: int  # at the requested context
    total_deployment: int


@dataclass
class KVReport:
    config_name: str
    context: int
    rows: list[KindRow]
    total_bf16: int
    total_deployment: int
    per_token_deployment_window_amortised: float  # entries + window rings, pending rows excluded
    gqa8_bytes: int
    v32_bytes: int

    @property
    def ratio_to_gqa8(self) -> float:
        return self.total_deployment / self.gqa8_bytes

    @property
    def ratio_to_v32(self) -> float:
        return self.total_deployment / self.v32_bytes

    @property
    def amortised_ratio_to_gqa8(self) -> float:
        """Per-token ratio without the compressors' pending rows (the published 2% figure)."""
        return self.per_token_deployment_window_amortised * self.context / self.gqa8_bytes if self.context else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratio_to_gqa8"] = self.ratio_to_gqa8
        out["ratio_to_v32"] = self.ratio_to_v32
        out["amortised_ratio_to_gqa8"] = self.amortised_ratio_to_gqa8
        return out


def kv_report(config: ModelConfig, context: int, config_name: str = "") -> KVReport:
    """Cache bytes of one sequence of ``context`` tokens; the MTP block is not counted."""
    if context < 0:
        raise ValueError(f"context must be >= 0 tokens, got {context}")
    formats = {"bf16": float_format(config, 2), "deployment": deployment_format(config)}
    rows: dict[str, KindRow] = {}
    for name, fmt in formats.items():
        for cost in layer_costs(config, fmt, include_mtp=False):
            row = rows.setdefault(cost.kind, KindRow(cost.kind, 0, 0.0, 0.0, 0, 0, 0, 0))
            entries = entries_at(context, cost.ratio)
            per_token = cost.entry_bytes / cost.ratio if cost.ratio else 0.0
            total = cost.fixed_bytes + entries * cost.entry_bytes
            if name == "bf16":
                row.layers += 1
                row.per_token_bf16 += per_token
                row.fixed_bf16 += cost.fixed_bytes
                row.total_bf16 += total
            else:
                row.per_token_deployment += per_token
                row.fixed_deployment += cost.fixed_bytes
                row.total_deployment += total
    ordered = [rows[k] for k in ("sliding", "csa", "hca") if k in rows]
    total_bf16 = sum(r.total_bf16 for r in ordered)
    total_deployment = sum(r.total_deployment for r in ordered)
    pending = sum(pending_bytes(config, ratio) for ratio in config.layer_ratios)
    amortised = (total_deployment - pending) / context if context else 0.0
    layers = config.num_hidden_layers
    return KVReport(config_name, context, ordered, total_bf16, total_deployment, amortised,
                    GQA8_BYTES_PER_TOKEN_LAYER * layers * context,
                    V32_BYTES_PER_TOKEN_LAYER * V32_LAYERS * context)


def format_report(report: KVReport) -> str:
    """Render a report as a plain-text table."""
    gib = 1024 ** 3
    lines = [f"KV cache of {report.config_name or 'config'} at {report.context:,} tokens "
             f"(one sequence, MTP block excluded)",
             f"{'layer kind':<10} {'layers':>6} {'B/token bf16':>13} {'B/token deploy':>15} "
             f"{'fixed bf16':>12} {'fixed deploy':>13} {'total bf16':>14} {'total deploy':>14}"]
    for r in report.rows:
        lines.append(f"{r.kind:<10} {r.layers:>6} {r.per_token_bf16:>13.2f} {r.per_token_deployment:>15.2f} "
                     f"{r.fixed_bf16:>12,} {r.fixed_deployment:>13,} {r.total_bf16:>14,} {r.total_deployment:>14,}")
    lines += [
        f"total bf16:        {report.total_bf16:,} B ({report.total_bf16 / gib:.2f} GiB)",
        f"total deployment:  {report.total_deployment:,} B ({report.total_deployment / gib:.2f} GiB), "
        f"{report.per_token_deployment_window_amortised:,.1f} B/token with the window amortised",
        f"GQA-8 bf16 baseline: {report.gqa8_bytes:,} B -> deployment cache is "
        f"{100 * report.ratio_to_gqa8:.2f}% of it ({100 * report.amortised_ratio_to_gqa8:.2f}% without "
        f"pending compressor rows)",
        f"DeepSeek-V3.2 FP8 baseline: {report.v32_bytes:,} B -> deployment cache is "
        f"{100 * report.ratio_to_v32:.2f}% of it",
    ]
    return "\n".join(lines)

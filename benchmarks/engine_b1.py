"""B1: KV cache bytes of V4-Flash and V4-Pro at 2^20 tokens (exact arithmetic, not timed).

    python benchmarks/engine_b1.py

prints the ``dsv4 kv`` tables and writes the section "B1" of docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_docs import write_section  # noqa: E402


def main() -> int:
    from dsv4.config import load_preset
    from dsv4.engine.kv_report import kv_report

    context = 1 << 20
    lines = ["| model | B/token bf16 (growth) | B/token deployment (window amortised) | total bf16 | "
             "total deployment | % of GQA-8 bf16 | % of V3.2 FP8 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("flash", "pro"):
        report = kv_report(load_preset(name), context, name)
        growth = sum(row.per_token_bf16 for row in report.rows)
        lines.append(f"| {name} | {growth:,.0f} | {report.per_token_deployment_window_amortised:,.1f} | "
                     f"{report.total_bf16 / 2**30:.2f} GiB | {report.total_deployment / 1e9:.2f} GB | "
                     f"{100 * report.amortised_ratio_to_gqa8:.2f} | {100 * report.ratio_to_v32:.1f} |")
    table = "\n".join(lines)
    print(table)
    body = (f"Computed {datetime.now(timezone.utc):%Y-%m-%d} by `python benchmarks/engine_b1.py` (the "
            f"arithmetic of `dsv4 kv`), one sequence of 2^20 tokens, MTP block excluded. Deployment "
            f"format: 583 B per KV entry (448 FP8 + 7 UE8M0 scales + 64 bf16 rope dims), 68 B per index "
            f"key (64 B FP4 + 4 scales), window rings stored like KV entries. The GQA-8 percentage leaves "
            f"out the compressors' pending rows (float32, 80 KiB per CSA and 512 KiB per HCA layer); "
            f"totals include them. The V3.2 baseline assumes 656 B + 132 B per token on 61 layers.\n\n{table}")
    write_section(ROOT / "docs" / "benchmarks.md", "B1. KV cache size at 2^20 tokens", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

import json

import pytest

from dsv4.cli.main import main
from dsv4.config import load_preset
from dsv4.engine.cache_manager import deployment_entry_bytes, pending_bytes
from dsv4.engine.kv_report import kv_report

MIB = 1 << 20


def test_released_entry_sizes():
    kv, key = deployment_entry_bytes(load_preset("flash"))
    assert (kv, key) == (583, 68)


def test_flash_hca_pending_bytes():
    assert pending_bytes(load_preset("flash"), 128) == 512 * 1024


@pytest.mark.parametrize("name, per_token_bf16, amortised, gqa_percent, v32_percent", [
    ("flash", 6880, 3512, 1.99, 7.3),
    ("pro", 9848, 5028, 2.01, 10.5),
])
def test_flash_and_pro_at_one_million_tokens(name, per_token_bf16, amortised, gqa_percent, v32_percent):
    report = kv_report(load_preset(name), MIB, name)
    growth_bf16 = sum(row.per_token_bf16 for row in report.rows)
    assert growth_bf16 == per_token_bf16
    assert round(report.per_token_deployment_window_amortised) == amortised
    assert round(100 * report.amortised_ratio_to_gqa8, 2) == gqa_percent
    assert round(100 * report.ratio_to_v32, 1) == v32_percent


def test_flash_totals_in_gib():
    report = kv_report(load_preset("flash"), MIB, "flash")
    assert round(report.total_bf16 / 2**30, 1) == 6.7
    assert round(report.total_deployment / 1e9, 2) == 3.69  # 3.68 GB plus 12 MB of pending rows
    csa = next(row for row in report.rows if row.kind == "csa")
    assert csa.layers == 21
    assert csa.per_token_deployment == pytest.approx(21 * (583 + 68) / 4)


def test_kv_command_json(capsys):
    assert main(["kv", "--config", "flash", "--context", str(MIB), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["context"] == MIB
    assert round(100 * data["amortised_ratio_to_gqa8"], 2) == 1.99


def test_kv_command_table(capsys):
    assert main(["kv", "--config", "pro", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "GQA-8 bf16 baseline" in out
    assert "hca" in out


def test_kv_command_rejects_negative_context(capsys):
    assert main(["kv", "--config", "pro", "--context", "-1"]) == 1
    assert "--context must be >= 0" in capsys.readouterr().err

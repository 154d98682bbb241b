"""write_random_checkpoint: determinism, cut configs, sharding, value ranges, CLI, tiny cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dsv4.cli.main import main as cli_main
from dsv4.config import ModelConfig, load_preset
from dsv4.model.checkpoint import INDEX_FILE, CheckpointReader
from dsv4.model.random_weights import sample_fp4
from dsv4.model.quant import dequantize_fp4
from dsv4.model.safetensors_io import SafetensorsFile
from dsv4.model.layout import expected_tensors
from dsv4.model.writer import (cut_config, ensure_tiny_checkpoint, plan_shards,
                               write_random_checkpoint)


def small_config() -> ModelConfig:
    return load_preset("test-mix")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("written") / "ckpt"
    return write_random_checkpoint(small_config(), out, seed=0, num_experts=4, progress=False)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_writer_deterministic_for_seed(written, tmp_path):
    again = write_random_checkpoint(small_config(), tmp_path / "again", seed=0, num_experts=4,
                                    progress=False)
    assert file_bytes(again) == file_bytes(written)


def test_writer_seed_changes_values(written, tmp_path):
    other = write_random_checkpoint(small_config(), tmp_path / "other", seed=1, num_experts=4,
                                    progress=False)
    first, second = CheckpointReader(written), CheckpointReader(other)
    for name in ("embed.weight", "layers.0.attn.wq_a.weight", "layers.1.ffn.experts.0.w1.weight"):
        assert not torch.equal(first.tensor(name).view(torch.uint8),
                               second.tensor(name).view(torch.uint8)), name


def test_writer_output_validates(written):
    reader = CheckpointReader(written)
    reader.validate()
    assert reader.config.n_routed_experts == 4
    assert reader.config.num_experts_per_tok == 2


def test_writer_config_json_is_hf_naming(written):
    raw = json.loads((written / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v4"
    assert raw["n_routed_experts"] == 4
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    assert raw["quantization_config"]["scale_fmt"] == "ue8m0"
    assert raw["expert_dtype"] == "fp4"


def test_cut_config_layers_and_experts():
    flash = load_preset("flash")
    cut = cut_config(flash, num_layers=1, num_experts=4)
    assert cut.num_hidden_layers == 1
    assert cut.compress_ratios == (0, 0)  # layer 0 plus the MTP block
    assert cut.num_hash_layers == 1
    assert cut.n_routed_experts == 4
    assert cut.num_experts_per_tok == 4
    three = cut_config(flash, num_layers=4)
    assert three.compress_ratios == (0, 0, 4, 128, 0)
    assert three.num_hash_layers == 3
    assert three.n_routed_experts == 256


def test_cut_config_rejects_out_of_range():
    with pytest.raises(ValueError, match="between 1 and num_hidden_layers=4, got 0"):
        cut_config(small_config(), num_layers=0)
    with pytest.raises(ValueError, match="between 1 and n_routed_experts=8, got 9"):
        cut_config(small_config(), num_experts=9)


def test_writer_rejects_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_random_checkpoint(small_config(), tmp_path, progress=False)


def test_writer_shards_and_index(tmp_path):
    out = write_random_checkpoint(small_config(), tmp_path / "sharded", num_experts=2,
                                  progress=False, max_shard_bytes=1 << 20)
    index = json.loads((out / INDEX_FILE).read_text())
    shard_names = sorted({*index["weight_map"].values()})
    count = len(shard_names)
    assert count > 2
    assert shard_names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    total = 0
    for shard_name in shard_names:
        shard = SafetensorsFile(out / shard_name)
        assert shard.data_start % 8 == 0
        for name, entry in shard.entries.items():
            assert index["weight_map"][name] == shard_name
            assert entry.begin % entry.dtype.itemsize == 0, name
            total += entry.nbytes
    assert index["metadata"]["total_size"] == total
    for name, shard_name in index["weight_map"].items():
        if name.endswith(".scale"):
            assert index["weight_map"][name.removesuffix(".scale") + ".weight"] == shard_name
    CheckpointReader(out).validate()


def test_plan_shards_limits_and_units():
    specs = expected_tensors(cut_config(small_config(), num_experts=2))
    limit = 300_000  # below the 512 x 256 bf16 embedding (262,144 bytes) plus the next unit
    shards = plan_shards(specs, limit)
    assert sorted(n for shard in shards for n in shard) == sorted(specs)
    for shard in shards:
        size = sum(specs[n].nbytes for n in shard)
        assert size <= limit or len({n.removesuffix(".scale").removesuffix(".weight")
                                     for n in shard}) == 1
        itemsizes = [specs[n].dtype.itemsize for n in shard]
        assert itemsizes == sorted(itemsizes, reverse=True)
    oversized = plan_shards(specs, 1)  # every unit gets its own shard
    assert ["layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale"] in oversized
    assert ["embed.weight"] in oversized


def test_writer_value_ranges(written):
    reader = CheckpointReader(written)
    d = reader.config.hidden_size

    def std(name: str) -> float:
        return float(reader.dequantized(name).std())

    assert std("layers.0.attn.wq_a.weight") == pytest.approx(d ** -0.5, rel=0.1)
    assert std("layers.0.attn.wo_b.weight") == pytest.approx(256 ** -0.5, rel=0.1)
    assert std("layers.1.ffn.experts.2.w2.weight") == pytest.approx(128 ** -0.5, rel=0.1)
    assert std("layers.1.attn.compressor.wkv.weight") == pytest.approx(d ** -0.5, rel=0.1)
    assert std("embed.weight") == pytest.approx(1.0, rel=0.05)
    assert std("head.weight") == pytest.approx(d ** -0.5, rel=0.05)
    norm = reader.dequantized("layers.0.attn_norm.weight")
    assert float(norm.mean()) == pytest.approx(1.0, abs=0.02)
    scale = reader.tensor("layers.2.hc_ffn_scale")
    assert scale.dtype == torch.float32
    assert bool(((scale >= 0.5) & (scale <= 1.0)).all())
    hc_fn = reader.tensor("layers.2.hc_attn_fn")
    assert float(hc_fn.std()) == pytest.approx(0.05 / (4 * d) ** 0.5, rel=0.1)
    assert float(reader.tensor("layers.3.ffn.gate.bias").abs().max()) < 0.6


def test_writer_tid2eid_distinct_experts(written):
    reader = CheckpointReader(written)
    table = reader.tensor("layers.0.ffn.gate.tid2eid")
    assert table.dtype == torch.int64
    assert table.shape == (512, 2)
    assert int(table.min()) >= 0
    assert int(table.max()) < 4
    assert bool((table[:, 0] != table[:, 1]).all())
    assert len(set(table[:, 0].tolist())) == 4  # every expert is used


@pytest.mark.parametrize("weight_dtype, expert_dtype", [("bf16", "bf16"), ("fp8", "fp8")])
def test_writer_other_storage(tmp_path, weight_dtype, expert_dtype):
    config = small_config().replace(weight_dtype=weight_dtype, expert_dtype=expert_dtype)
    out = write_random_checkpoint(config, tmp_path / "ckpt", num_experts=2, progress=False)
    reader = CheckpointReader(out)
    reader.validate()
    expert = reader.tensor("layers.1.ffn.experts.0.w1.weight")
    assert expert.dtype == (torch.bfloat16 if expert_dtype == "bf16" else torch.float8_e4m3fn)
    has_scales = any(name.endswith(".scale") for name in reader.names())
    assert has_scales == (weight_dtype == "fp8")


def test_sample_fp4_statistics():
    packed, scale = sample_fp4((256, 512), 1024 ** -0.5, seed=5)
    assert packed.shape == (256, 512)
    assert scale.shape == (256, 32)
    values = dequantize_fp4(packed, scale)
    assert float(values.std()) == pytest.approx(1024 ** -0.5, rel=0.05)
    assert abs(float(values.mean())) < 1e-3
    exponents = set(scale.view(torch.uint8).flatten().tolist())
    assert len(exponents) == 2  # groups use s or 2s
    again, _ = sample_fp4((256, 512), 1024 ** -0.5, seed=5)
    assert torch.equal(packed, again)


def test_cli_init_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["init-checkpoint", "--config", "test-mix", "--out", str(out),
                     "--layers", "2", "--experts", "2", "--seed", "7", "--no-progress"])
    assert code == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw["num_hidden_layers"] == 2
    assert raw["compress_ratios"] == [0, 4, 0]
    assert cli_main(["validate-checkpoint", str(out)]) == 0
    assert "tensors match config.json" in capsys.readouterr().out


def test_cli_init_checkpoint_errors(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert cli_main(["init-checkpoint", "--config", "test-mix", "--out", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["init-checkpoint", "--config", "no-such", "--out", str(tmp_path / "n")]) == 1
    assert "neither a config preset" in capsys.readouterr().err


def test_ensure_tiny_checkpoint_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
    path = ensure_tiny_checkpoint()
    assert path == tmp_path / "tiny"
    reader = CheckpointReader(path)
    reader.validate()
    assert reader.config == load_preset("tiny")
    stamp = os.stat(path / INDEX_FILE).st_mtime_ns
    assert ensure_tiny_checkpoint() == path
    assert os.stat(path / INDEX_FILE).st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging directory left


def test_written_checkpoint_forward_is_order_one(written):
    from dsv4.model.loading import load_model

    model = load_model(written, numerics="plain", dtype=torch.float32)
    input_ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids)  # [1, 40, 512]
    assert bool(torch.isfinite(logits).all())
    assert 0.5 < float(logits.std()) < 2.0
    assert float(logits[0, 0].sub(logits[0, 1]).abs().max()) > 0.1  # positions differ

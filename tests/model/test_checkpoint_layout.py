"""expected_tensors against the released layout: fixture checkpoints and Flash/Pro shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4.config import ModelConfig, load_preset
from dsv4.model.layout import TensorSpec, expected_tensors
from dsv4.model.safetensors_io import SafetensorsFile

FIXTURES = Path(__file__).resolve().parents[2] / "../shared/fixtures/reference_logits"
FIXTURE_NAMES = ["mix16", "flash16"]

FP8, E8M0, I8, BF16, F32 = (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8,
                            torch.bfloat16, torch.float32)


def fixture_dir(name: str) -> Path:
    path = (FIXTURES / name / "checkpoint").resolve()
    if not path.is_dir():
        pytest.skip(f"fixture checkpoint {path} not available")
    return path


def stored_specs(checkpoint: Path) -> dict[str, TensorSpec]:
    specs = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        for name, entry in SafetensorsFile(shard).entries.items():
            specs[name] = TensorSpec(entry.shape, entry.dtype)
    return specs


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_layout_matches_fixture_checkpoint(name):
    checkpoint = fixture_dir(name)
    config = ModelConfig.from_file(checkpoint / "config.json")
    expected = expected_tensors(config)
    stored = stored_specs(checkpoint)
    assert sorted(set(expected) - set(stored)) == []
    assert sorted(set(stored) - set(expected)) == []
    mismatched = {n: (expected[n], stored[n]) for n in expected if expected[n] != stored[n]}
    assert mismatched == {}


FLASH_SHAPES = {
    "embed.weight": ((129280, 4096), BF16),
    "head.weight": ((129280, 4096), BF16),
    "hc_head_fn": ((4, 16384), F32),
    "hc_head_base": ((4,), F32),
    "hc_head_scale": ((1,), F32),
    "layers.0.hc_attn_fn": ((24, 16384), F32),
    "layers.0.hc_ffn_base": ((24,), F32),
    "layers.0.hc_ffn_scale": ((3,), F32),
    "layers.0.attn.wq_a.weight": ((1024, 4096), FP8),
    "layers.0.attn.wq_a.scale": ((8, 32), E8M0),
    "layers.0.attn.wq_b.weight": ((32768, 1024), FP8),
    "layers.0.attn.wkv.weight": ((512, 4096), FP8),
    "layers.0.attn.wo_a.weight": ((8192, 4096), FP8),
    "layers.0.attn.wo_b.weight": ((4096, 8192), FP8),
    "layers.0.attn.wo_b.scale": ((32, 64), E8M0),
    "layers.0.attn.attn_sink": ((64,), F32),
    "layers.0.ffn.gate.weight": ((256, 4096), BF16),
    "layers.0.ffn.gate.tid2eid": ((129280, 6), torch.int64),
    "layers.0.ffn.experts.255.w1.weight": ((2048, 2048), I8),
    "layers.0.ffn.experts.255.w1.scale": ((2048, 128), E8M0),
    "layers.0.ffn.experts.0.w2.weight": ((4096, 1024), I8),
    "layers.0.ffn.experts.0.w2.scale": ((4096, 64), E8M0),
    "layers.0.ffn.shared_experts.w2.weight": ((4096, 2048), FP8),
    "layers.2.attn.compressor.wkv.weight": ((1024, 4096), BF16),
    "layers.2.attn.compressor.ape": ((4, 1024), F32),
    "layers.2.attn.compressor.norm.weight": ((512,), BF16),
    "layers.2.attn.indexer.wq_b.weight": ((8192, 1024), FP8),
    "layers.2.attn.indexer.weights_proj.weight": ((64, 4096), BF16),
    "layers.2.attn.indexer.compressor.wkv.weight": ((256, 4096), BF16),
    "layers.2.attn.indexer.compressor.ape": ((4, 256), F32),
    "layers.3.attn.compressor.wkv.weight": ((512, 4096), BF16),
    "layers.3.attn.compressor.ape": ((128, 512), F32),
    "layers.3.ffn.gate.bias": ((256,), F32),
    "mtp.0.e_proj.weight": ((4096, 4096), FP8),
    "mtp.0.h_proj.scale": ((32, 32), E8M0),
    "mtp.0.hc_head_fn": ((4, 16384), F32),
    "mtp.0.ffn.gate.bias": ((256,), F32),
}


@pytest.fixture(scope="module")
def flash_specs() -> dict[str, TensorSpec]:
    return expected_tensors(load_preset("flash"))


def test_layout_flash_shapes(flash_specs):
    specs = flash_specs
    for name, (shape, dtype) in FLASH_SHAPES.items():
        assert specs[name] == TensorSpec(shape, dtype), name


def test_layout_flash_layer_structure(flash_specs):
    specs = flash_specs
    layers = {int(n.split(".")[1]) for n in specs if n.startswith("layers.")}
    assert layers == set(range(43))
    assert "layers.0.attn.compressor.ape" not in specs  # sliding only
    assert "layers.3.attn.indexer.wq_b.weight" not in specs  # HCA has no indexer
    assert "layers.2.ffn.gate.bias" not in specs  # hash-routed
    assert "layers.3.ffn.gate.tid2eid" not in specs
    assert "mtp.0.attn.compressor.ape" not in specs
    assert sum(1 for n in specs if n.startswith("layers.5.ffn.experts.")) == 256 * 6


def test_layout_flash_total_size(flash_specs):
    # About 160 GB: FP8 dense weights, FP4 experts, bf16 embeddings (the released Flash size).
    total = sum(spec.nbytes for spec in flash_specs.values())
    assert 155e9 < total < 165e9


def test_layout_pro_expert_shapes():
    specs = expected_tensors(load_preset("pro"))
    assert specs["layers.0.ffn.experts.0.w1.weight"] == TensorSpec((3072, 3584), I8)
    assert specs["layers.0.ffn.experts.0.w1.scale"] == TensorSpec((3072, 224), E8M0)
    assert specs["layers.0.ffn.experts.0.w2.weight"] == TensorSpec((7168, 1536), I8)
    assert specs["layers.0.ffn.experts.0.w2.scale"] == TensorSpec((7168, 96), E8M0)
    assert specs["layers.0.attn.compressor.ape"] == TensorSpec((128, 512), F32)


def test_layout_bf16_weights_have_no_scales():
    config = load_preset("test-mix").replace(weight_dtype="bf16", expert_dtype="bf16")
    specs = expected_tensors(config)
    assert not [n for n in specs if n.endswith(".scale")]
    assert specs["layers.0.attn.wq_a.weight"] == TensorSpec((128, 256), BF16)
    assert specs["layers.0.ffn.experts.0.w1.weight"] == TensorSpec((128, 256), BF16)


def test_layout_fp8_experts():
    config = load_preset("test-mix").replace(expert_dtype="fp8")
    specs = expected_tensors(config)
    assert specs["layers.0.ffn.experts.0.w1.weight"] == TensorSpec((128, 256), FP8)
    assert specs["layers.0.ffn.experts.0.w1.scale"] == TensorSpec((1, 2), E8M0)
    assert specs["layers.0.ffn.experts.0.w2.weight"] == TensorSpec((256, 128), FP8)

"""CheckpointReader on valid and deliberately broken checkpoints written into tmp_path."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.config import ConfigError, load_preset
from dsv4.model import hf_names
from dsv4.model.checkpoint import INDEX_FILE, CheckpointError, CheckpointReader
from dsv4.model.writer import write_random_checkpoint

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    # test-mix with 2 experts: every layer kind, FP8 and FP4 storage, a few MB.
    out = tmp_path_factory.mktemp("base") / "ckpt"
    return write_random_checkpoint(load_preset("test-mix"), out, num_experts=2, progress=False)


@pytest.fixture()
def checkpoint(base_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(base_checkpoint, tmp_path / "ckpt"))


def load_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def rewrite(checkpoint: Path, *, drop=(), add=None) -> None:
    """Rewrite the single shard with tensors removed/added/replaced, and update the index."""
    shard = checkpoint / SHARD
    tensors = load_all(shard)
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    index["weight_map"] = {name: SHARD for name in tensors}
    (checkpoint / INDEX_FILE).write_text(json.dumps(index))


def validation_error(checkpoint: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        CheckpointReader(checkpoint).validate()
    return str(caught.value)


def test_reader_valid_checkpoint(checkpoint):
    reader = CheckpointReader(checkpoint)
    reader.validate()
    assert reader.naming == "official"
    assert reader.config.n_routed_experts == 2


def test_reader_matches_safetensors_library(checkpoint):
    reader = CheckpointReader(checkpoint)
    reference = load_all(checkpoint / SHARD)
    assert sorted(reader.names()) == sorted(reference)
    for name, expected in reference.items():
        stored = reader.tensor(name)
        assert stored.dtype == expected.dtype, name
        assert torch.equal(stored.view(torch.uint8), expected.view(torch.uint8)), name


def test_reader_keeps_quantized_storage(checkpoint):
    reader = CheckpointReader(checkpoint)
    assert reader.tensor("layers.0.attn.wq_a.weight").dtype == torch.float8_e4m3fn
    assert reader.tensor("layers.0.attn.wq_a.scale").dtype == torch.float8_e8m0fnu
    assert reader.tensor("layers.0.ffn.experts.1.w2.weight").dtype == torch.int8
    assert reader.dequantized("layers.0.ffn.experts.1.w2.weight").shape == (256, 128)


def test_reader_tensor_is_copy_on_write(checkpoint):
    before = (checkpoint / SHARD).read_bytes()
    tensor = CheckpointReader(checkpoint).tensor("layers.0.attn_norm.weight")
    tensor.fill_(3.0)
    assert (checkpoint / SHARD).read_bytes() == before


def test_error_missing_tensor(checkpoint):
    rewrite(checkpoint, drop=["layers.1.attn_norm.weight"])
    message = validation_error(checkpoint)
    assert "missing tensor 'layers.1.attn_norm.weight'" in message
    assert "BF16[256]" in message


def test_error_unexpected_tensor(checkpoint):
    rewrite(checkpoint, add={"layers.0.attn.extra.weight": torch.zeros(4, 4)})
    message = validation_error(checkpoint)
    assert "unexpected tensor 'layers.0.attn.extra.weight'" in message
    assert SHARD in message
    assert "F32[4, 4]" in message


def test_error_wrong_shape(checkpoint):
    rewrite(checkpoint, add={"layers.0.attn.kv_norm.weight": torch.ones(127, dtype=torch.bfloat16)})
    message = validation_error(checkpoint)
    assert "'layers.0.attn.kv_norm.weight'" in message
    assert SHARD in message
    assert "wrong shape: expected BF16[128], found BF16[127]" in message


def test_error_wrong_dtype(checkpoint):
    rewrite(checkpoint, add={"layers.2.attn.attn_sink": torch.zeros(8, dtype=torch.bfloat16)})
    message = validation_error(checkpoint)
    assert "'layers.2.attn.attn_sink'" in message
    assert "wrong dtype: expected F32[8], found BF16[8]" in message


def test_error_dequantized_weight_beside_scale(checkpoint):
    weight = CheckpointReader(checkpoint).dequantized("layers.0.attn.wq_b.weight", torch.bfloat16)
    rewrite(checkpoint, add={"layers.0.attn.wq_b.weight": weight})
    message = validation_error(checkpoint)
    assert "wrong dtype: expected F8_E4M3[1024, 128], found BF16[1024, 128]" in message


def test_error_fp8_weight_without_scale(checkpoint):
    rewrite(checkpoint, drop=["layers.0.attn.wq_a.scale"])
    message = validation_error(checkpoint)
    assert "'layers.0.attn.wq_a.weight'" in message
    assert "no scale tensor 'layers.0.attn.wq_a.scale'" in message
    assert "F8_E8M0[1, 2]" in message


def test_error_fp4_weight_without_scale(checkpoint):
    rewrite(checkpoint, drop=["layers.1.ffn.experts.0.w3.scale"])
    message = validation_error(checkpoint)
    assert "no scale tensor 'layers.1.ffn.experts.0.w3.scale'" in message
    assert "F8_E8M0[128, 8]" in message


def test_error_scale_beside_bf16_weight(checkpoint):
    scale = torch.full((2, 2), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    rewrite(checkpoint, add={"layers.1.attn.compressor.wkv.scale": scale})
    message = validation_error(checkpoint)
    assert "unexpected scale tensor 'layers.1.attn.compressor.wkv.scale'" in message
    assert "is BF16 and takes no scale" in message


def test_error_truncated_shard(checkpoint):
    shard = checkpoint / SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{SHARD}.*truncated") as caught:
        CheckpointReader(checkpoint)
    assert "tensor '" in str(caught.value)


def test_error_header_not_json(checkpoint):
    shard = checkpoint / SHARD
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{SHARD}: header is not valid JSON"):
        CheckpointReader(checkpoint)


def test_error_header_length_past_end(checkpoint):
    shard = checkpoint / SHARD
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{SHARD}: header length .* exceeds the file size"):
        CheckpointReader(checkpoint)


def test_error_empty_shard(checkpoint):
    (checkpoint / SHARD).write_bytes(b"")
    with pytest.raises(CheckpointError, match="too short"):
        CheckpointReader(checkpoint)


def test_error_index_names_missing_shard(checkpoint):
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    index["weight_map"]["head.weight"] = "model-00002-of-00002.safetensors"
    (checkpoint / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'head.weight' to shard "
                                              r"'model-00002-of-00002.safetensors', which does not exist"):
        CheckpointReader(checkpoint)


def test_error_index_names_absent_tensor(checkpoint):
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    index["weight_map"]["layers.0.attn.ghost.weight"] = SHARD
    (checkpoint / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'layers.0.attn.ghost.weight'.*does not contain it"):
        CheckpointReader(checkpoint)


def test_error_index_not_json(checkpoint):
    (checkpoint / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointReader(checkpoint)


def test_error_no_weights(checkpoint):
    (checkpoint / INDEX_FILE).unlink()
    (checkpoint / SHARD).unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor"):
        CheckpointReader(checkpoint)


def test_error_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="config file not found"):
        CheckpointReader(checkpoint)


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        CheckpointReader(tmp_path / "nowhere")


def test_error_nan_scale_named(checkpoint):
    scale = torch.full((1, 2), 255, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    rewrite(checkpoint, add={"layers.0.attn.wq_a.scale": scale})
    reader = CheckpointReader(checkpoint)
    reader.validate()  # shapes and dtypes are fine; the bytes are not
    pattern = rf"'layers.0.attn.wq_a.scale' in .*{SHARD} contains 2 NaN byte"
    with pytest.raises(CheckpointError, match=pattern):
        reader.tensor("layers.0.attn.wq_a.scale")
    with pytest.raises(CheckpointError, match=pattern):
        reader.dequantized("layers.0.attn.wq_a.weight")
    unchecked = CheckpointReader(checkpoint, check_scales=False)
    assert unchecked.tensor("layers.0.attn.wq_a.scale").view(torch.uint8).tolist() == [[255, 255]]


def test_error_lists_every_problem(checkpoint):
    rewrite(checkpoint, drop=["norm.weight", "layers.0.attn.wq_a.scale"],
            add={"layers.9.attn_norm.weight": torch.ones(256, dtype=torch.bfloat16)})
    message = validation_error(checkpoint)
    assert "3 problem(s)" in message
    assert "'norm.weight'" in message
    assert "'layers.0.attn.wq_a.scale'" in message
    assert "'layers.9.attn_norm.weight'" in message


def write_transformers_checkpoint(source: Path, out: Path, dtype: torch.dtype) -> None:
    reader = CheckpointReader(source)
    dequantized = {}
    for name in reader.names():
        if name.endswith(".scale"):
            continue
        if name.endswith("tid2eid"):
            dequantized[name] = reader.tensor(name).clone()
        else:
            dequantized[name] = reader.dequantized(name, dtype)
    state = hf_names.to_transformers_state_dict(dequantized)
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")


def test_reader_accepts_transformers_names(checkpoint, tmp_path):
    converted = tmp_path / "hf"
    write_transformers_checkpoint(checkpoint, converted, torch.float32)
    config = json.loads((converted / "config.json").read_text())
    config.pop("quantization_config")
    config["expert_dtype"] = None  # a dequantized export stores plain floats
    (converted / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(converted)
    assert reader.naming == "transformers"
    reader.validate()
    original = CheckpointReader(checkpoint)
    for name in ("layers.1.ffn.experts.1.w1.weight", "layers.1.ffn.experts.1.w3.weight",
                 "layers.1.ffn.experts.0.w2.weight", "layers.1.attn.indexer.wq_b.weight",
                 "layers.2.attn.compressor.ape", "hc_head_fn", "head.weight"):
        assert torch.equal(reader.tensor(name).float(), original.dequantized(name)), name
    assert "mtp.0.e_proj.weight" not in reader


def test_transformers_names_wrong_shape_reported(checkpoint, tmp_path):
    converted = tmp_path / "hf"
    write_transformers_checkpoint(checkpoint, converted, torch.bfloat16)
    config = json.loads((converted / "config.json").read_text())
    config.pop("quantization_config")
    config["expert_dtype"] = None
    config["moe_intermediate_size"] = 64
    (converted / "config.json").write_text(json.dumps(config))
    message = validation_error(converted)
    assert "'layers.0.ffn.experts.0.w1.weight' in model.safetensors has the wrong shape" in message

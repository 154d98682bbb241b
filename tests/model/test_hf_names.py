"""Name mapping to transformers' DeepseekV4ForCausalLM, checked against the real module."""

from __future__ import annotations

import pytest
import torch

from dsv4.config import load_preset
from dsv4.model import hf_names
from dsv4.model.layout import expected_tensors

transformers = pytest.importorskip("transformers")


def random_official_tensors(config) -> dict[str, torch.Tensor]:
    """Random float tensors under every official name (scales dropped, experts dequantized)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, spec in expected_tensors(config).items():
        if name.endswith(".scale"):
            continue
        shape = spec.shape
        if spec.dtype == torch.int8:  # packed FP4: two values per byte
            shape = (shape[0], 2 * shape[1])
        if spec.dtype == torch.int64:
            tensors[name] = torch.randint(0, config.n_routed_experts, shape, generator=generator)
        else:
            tensors[name] = torch.randn(shape, generator=generator)
    return tensors


@pytest.fixture(scope="module")
def mapped_model():
    config = load_preset("test-mix")
    hf_config = hf_names.to_transformers_config(config)
    model = transformers.DeepseekV4ForCausalLM(hf_config)
    tensors = random_official_tensors(config)
    state = hf_names.to_transformers_state_dict(tensors)
    return config, model, tensors, state


def test_state_dict_loads_strict(mapped_model):
    _, model, _, state = mapped_model
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


def test_state_dict_covers_every_key(mapped_model):
    _, model, _, state = mapped_model
    assert set(state) == set(model.state_dict())


def test_state_dict_shapes_match(mapped_model):
    _, model, _, state = mapped_model
    target = model.state_dict()
    wrong = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
             if v.shape != target[k].shape}
    assert wrong == {}


def test_experts_stacked_w1_then_w3(mapped_model):
    _, _, tensors, state = mapped_model
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, d]
    down = state["model.layers.1.mlp.experts.down_proj"]  # [E, d, I]
    width = tensors["layers.1.ffn.experts.0.w1.weight"].shape[0]
    assert gate_up.shape == (8, 2 * width, 256)
    assert torch.equal(gate_up[5, :width], tensors["layers.1.ffn.experts.5.w1.weight"])
    assert torch.equal(gate_up[5, width:], tensors["layers.1.ffn.experts.5.w3.weight"])
    assert torch.equal(down[7], tensors["layers.1.ffn.experts.7.w2.weight"])


def test_mtp_tensors_dropped(mapped_model):
    _, _, _, state = mapped_model
    assert not [k for k in state if "mtp" in k]


def test_config_layer_types(mapped_model):
    config, model, _, _ = mapped_model
    hf_config = model.config
    assert hf_config.layer_types == ["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention", "compressed_sparse_attention"]
    assert hf_config.compress_rates["heavily_compressed_attention"] == 8
    assert hf_config.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe"]
    assert hf_config.qk_rope_head_dim == config.qk_rope_head_dim
    assert hf_config.rope_parameters["compress"]["rope_type"] == "yarn"
    assert hf_config.rope_parameters["compress"]["rope_theta"] == 160000.0
    assert hf_config.rope_parameters["main"]["rope_theta"] == 10000.0


def test_config_rejects_two_hca_ratios():
    with pytest.raises(ValueError, match=r"one HCA compress ratio.*\[8, 16\]"):
        hf_names.to_transformers_config(load_preset("test-window"))


@pytest.mark.parametrize("official, expected", [
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("hc_head_base", "model.hc_head.hc_base"),
    ("layers.3.hc_ffn_fn", "model.layers.3.ffn_hc.fn"),
    ("layers.2.attn.attn_sink", "model.layers.2.self_attn.sinks"),
    ("layers.2.attn.indexer.compressor.ape",
     "model.layers.2.self_attn.compressor.indexer.position_bias"),
    ("layers.2.attn.indexer.weights_proj.weight",
     "model.layers.2.self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("layers.4.attn.compressor.norm.weight", "model.layers.4.self_attn.compressor.kv_norm.weight"),
    ("layers.0.ffn.gate.bias", "model.layers.0.mlp.gate.e_score_correction_bias"),
    ("layers.0.ffn.shared_experts.w2.weight", "model.layers.0.mlp.shared_experts.down_proj.weight"),
    ("layers.0.ffn.experts.17.w3.weight", "model.layers.0.mlp.experts.gate_up_proj"),
    ("layers.0.ffn.experts.17.w2.weight", "model.layers.0.mlp.experts.down_proj"),
])
def test_official_to_transformers(official, expected):
    assert hf_names.official_to_transformers(official) == expected


def test_names_round_trip():
    for name in expected_tensors(load_preset("test-mix")):
        target = hf_names.official_to_transformers(name)
        if target is None:
            assert name.startswith("mtp.") or name.endswith(".scale")
        elif ".experts." in name and ".shared_experts." not in name:
            assert hf_names.split_stacked_name(target) is not None
        else:
            assert hf_names.transformers_to_official(target) == name


def test_unknown_names_rejected():
    with pytest.raises(KeyError, match="not a DeepSeek-V4 tensor name"):
        hf_names.official_to_transformers("layers.0.attn.wq_c.weight")
    with pytest.raises(KeyError, match="not a transformers"):
        hf_names.transformers_to_official("model.layers.0.self_attn.nothing")
    with pytest.raises(KeyError, match="stacks every routed expert"):
        hf_names.transformers_to_official("model.layers.0.mlp.experts.down_proj")


def test_state_dict_rejects_scales():
    with pytest.raises(ValueError, match="dequantize"):
        hf_names.to_transformers_state_dict({"layers.0.attn.wq_a.scale": torch.zeros(1)})


def test_state_dict_rejects_incomplete_experts():
    tensors = {f"layers.0.ffn.experts.{e}.{w}.weight": torch.zeros(2, 2)
               for e in range(3) for w in ("w1", "w2", "w3")}
    del tensors["layers.0.ffn.experts.1.w2.weight"]
    with pytest.raises(ValueError, match="w2 are incomplete"):
        hf_names.to_transformers_state_dict(tensors)


def test_reader_loads_save_pretrained(mapped_model, tmp_path):
    from dsv4.model.checkpoint import CheckpointReader

    config, model, tensors, state = mapped_model
    model.load_state_dict(state, strict=True)
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    assert reader.naming == "transformers"
    assert reader.config == config.replace(weight_dtype="bf16", expert_dtype="bf16",
                                           num_nextn_predict_layers=0,
                                           compress_ratios=config.layer_ratios)
    reader.validate()
    official = [n for n in tensors if not n.startswith("mtp.")]
    assert sorted(reader.names()) == sorted(official)
    for name in official:
        assert torch.equal(reader.tensor(name).to(tensors[name].dtype), tensors[name]), name


def test_config_from_transformers_round_trip():
    for preset in ("test-mix", "tiny", "flash", "pro"):
        config = load_preset(preset).replace(weight_dtype="bf16", expert_dtype="bf16")
        raw = hf_names.to_transformers_config(config).to_dict()
        assert hf_names.is_transformers_config(raw)
        assert hf_names.config_from_transformers(raw) == config, preset


def test_config_from_transformers_rejects_bad_layer_types():
    raw = hf_names.to_transformers_config(load_preset("test-mix")).to_dict()
    raw["layer_types"][1] = "full_attention"
    with pytest.raises(ValueError, match="layer_types must list"):
        hf_names.config_from_transformers(raw, source="cfg.json")
    raw = hf_names.to_transformers_config(load_preset("test-mix")).to_dict()
    raw["mlp_layer_types"] = ["moe", "hash_moe", "moe", "moe"]
    with pytest.raises(ValueError, match="hash_moe layers must come first"):
        hf_names.config_from_transformers(raw, source="cfg.json")


def test_saved_transformers_export_runs_like_official(tmp_path):
    from dsv4.model.checkpoint import CheckpointReader
    from dsv4.model.loading import load_model
    from dsv4.model.writer import write_random_checkpoint

    official = write_random_checkpoint(load_preset("test-mix"), tmp_path / "official",
                                       progress=False)
    reader = CheckpointReader(official)
    dequantized = {name: reader.tensor(name).clone() if name.endswith("tid2eid")
                   else reader.dequantized(name)
                   for name in reader.names() if not name.endswith(".scale")}
    hf_model = transformers.DeepseekV4ForCausalLM(hf_names.to_transformers_config(reader.config))
    hf_model.float().eval()
    hf_model.load_state_dict(hf_names.to_transformers_state_dict(dequantized), strict=True)
    hf_model.save_pretrained(tmp_path / "export")

    input_ids = torch.randint(0, 512, (1, 37), generator=torch.Generator().manual_seed(1))
    expected = load_model(official, numerics="plain", dtype=torch.float32)(input_ids)
    logits = load_model(tmp_path / "export", numerics="plain", dtype=torch.float32)(input_ids)
    assert logits.shape == (1, 37, 512)
    assert float((logits - expected).abs().max()) <= 1e-5

"""Mapping between DeepSeek's tensor names and those of transformers' ``DeepseekV4ForCausalLM``.

The released checkpoints use DeepSeek's inference names; transformers (5.x, ``deepseek_v4``)
renames them on load. Differences beyond renames:

* routed experts are stacked per layer: ``mlp.experts.gate_up_proj`` ``[E, 2I, d]`` contains every
  expert's ``w1`` rows followed by its ``w3`` rows, ``mlp.experts.down_proj`` ``[E, d, I]``
  contains the ``w2`` weights;
* transformers has no MTP block, so ``mtp.*`` tensors have no transformers name;
* its weights are dequantized, so ``.scale`` tensors have no transformers name either.
"""

from __future__ import annotations

import dataclasses
import re
from itertools import dropwhile
from typing import TYPE_CHECKING, Any, Mapping

import torch

from dsv4.config import ConfigError, ModelConfig, RopeScaling

if TYPE_CHECKING:
    from transformers import DeepseekV4Config

# Official name -> transformers name, for tensors outside the layers.
_TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}

# Name inside ``layers.{i}.`` (official) -> name inside ``model.layers.{i}.`` (transformers).
_IN_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    # transformers nests the CSA indexer inside the compressor module.
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}

_TOP_LEVEL_INVERSE = {hf: official for official, hf in _TOP_LEVEL.items()}
# In-layer names that save_pretrained writes differently from the official ones.
_SAVED_IN_LAYER = {"attn.norm.weight": "attn.kv_norm.weight"}
_IN_LAYER_INVERSE = {hf: official for official, hf in _IN_LAYER.items()}

_OFFICIAL_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OFFICIAL_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
GATE_UP = "mlp.experts.gate_up_proj"
DOWN = "mlp.experts.down_proj"
_HF_STACKED = re.compile(r"^model\.layers\.(\d+)\.(mlp\.experts\.(?:gate_up_proj|down_proj))$")


def official_to_transformers(name: str) -> str | None:
    """Return the transformers name of official tensor ``name``.

    Routed-expert weights map to their layer's stacked tensor (``gate_up_proj`` for ``w1`` and
    ``w3``, ``down_proj`` for ``w2``). ``mtp.*`` and ``.scale`` tensors return None because
    transformers has no MTP block and keeps no scales. Raises ``KeyError`` for unknown names.
    """
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if name.startswith("mtp.") or name.endswith(".scale"):
        return None
    expert = _OFFICIAL_EXPERT.match(name)
    if expert:
        layer, _, weight = expert.groups()
        return f"model.layers.{layer}.{DOWN if weight == 'w2' else GATE_UP}"
    match = _OFFICIAL_LAYER.match(name)
    if match and match.group(2) in _IN_LAYER:
        return f"model.layers.{match.group(1)}.{_IN_LAYER[match.group(2)]}"
    raise KeyError(f"{name!r} is not a DeepSeek-V4 tensor name")


def transformers_to_official(name: str) -> str:
    """Return the official name of a one-to-one transformers tensor name.

    Accepts the module names of a loaded ``DeepseekV4ForCausalLM`` and the names its
    ``save_pretrained`` writes (transformers 5.23 reverts its renames inside the layers but
    keeps the ``model.`` prefix, and writes the attention ``kv_norm`` as ``attn.norm``).
    Raises ``KeyError`` for unknown names and for the stacked expert tensors, which contain
    many official tensors (see ``split_stacked_name``).
    """
    if name in _TOP_LEVEL_INVERSE:
        return _TOP_LEVEL_INVERSE[name]
    if name in _TOP_LEVEL:
        return name  # save_pretrained writes the head under its official name
    match = _HF_LAYER.match(name)
    if match:
        layer, rest = match.groups()
        if rest in _IN_LAYER_INVERSE:
            return f"layers.{layer}.{_IN_LAYER_INVERSE[rest]}"
        rest = _SAVED_IN_LAYER.get(rest, rest)
        official = f"layers.{layer}.{rest}"
        if rest in _IN_LAYER or _OFFICIAL_EXPERT.match(official):
            return official
    if _HF_STACKED.match(name):
        raise KeyError(f"{name!r} stacks every routed expert of a layer, so it has no single "
                       "official name")
    raise KeyError(f"{name!r} is not a transformers DeepseekV4ForCausalLM tensor name")


def split_stacked_name(name: str) -> tuple[int, str] | None:
    """Return ``(layer, "gate_up_proj" | "down_proj")`` for a stacked expert name, else None."""
    match = _HF_STACKED.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2).rsplit(".", 1)[1]


def is_transformers_name(name: str) -> bool:
    return name.startswith("model.") or name == "lm_head.weight"


def to_transformers_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename dequantized official tensors for ``DeepseekV4ForCausalLM.load_state_dict``.

    Routed experts are stacked per layer (``gate_up_proj [E, 2I, d]`` = w1 rows then w3 rows,
    ``down_proj [E, d, I]``), ``mtp.*`` tensors are dropped, and a ``.scale`` tensor raises
    ``ValueError`` because the weights must be dequantized first.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if name.startswith("mtp."):
            continue
        if name.endswith(".scale"):
            raise ValueError(f"{name}: dequantize the weights before mapping them to "
                             "transformers names (transformers keeps no scales)")
        expert = _OFFICIAL_EXPERT.match(name)
        if expert:
            layer, index, weight = expert.groups()
            experts.setdefault(int(layer), {}).setdefault(weight, {})[int(index)] = tensor
            continue
        target = official_to_transformers(name)
        if target is not None:
            out[target] = tensor
    for layer, weights in experts.items():
        count = len(weights.get("w1", {}))
        for weight in ("w1", "w2", "w3"):
            found = sorted(weights.get(weight, {}))
            if found != list(range(count)):
                raise ValueError(f"layers.{layer}: routed experts of {weight} are incomplete "
                                 f"(found indices {found}, expected 0..{count - 1})")
        gate = torch.stack([weights["w1"][e] for e in range(count)])  # [E, I, d]
        up = torch.stack([weights["w3"][e] for e in range(count)])  # [E, I, d]
        out[f"model.layers.{layer}.{GATE_UP}"] = torch.cat([gate, up], dim=1)  # [E, 2I, d]
        out[f"model.layers.{layer}.{DOWN}"] = torch.stack(
            [weights["w2"][e] for e in range(count)])  # [E, d, I]
    return out


def to_transformers_config(config: ModelConfig) -> "DeepseekV4Config":
    """Build the ``transformers.DeepseekV4Config`` (transformers 5.x) of ``config``.

    transformers gives every HCA layer one compress rate and every CSA layer rate 4, so a
    config with two different HCA ratios raises ``ValueError``.
    """
    from transformers import DeepseekV4Config

    kinds = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
             "hca": "heavily_compressed_attention"}
    hca_ratios = sorted({r for r in config.layer_ratios if r not in (0, 4)})
    if len(hca_ratios) > 1:
        raise ValueError(f"transformers supports one HCA compress ratio per model, this config "
                         f"has {hca_ratios}")
    rope = config.rope_scaling
    return DeepseekV4Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        q_lora_rank=config.q_lora_rank,
        num_experts_per_tok=config.num_experts_per_tok,
        n_routed_experts=config.n_routed_experts,
        n_shared_experts=config.n_shared_experts,
        scoring_func=config.scoring_func,
        norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        compress_rope_theta=config.compress_rope_theta,
        layer_types=[kinds[config.layer_kind(r)] for r in config.layer_ratios],
        compress_rates={"compressed_sparse_attention": 4,
                        "heavily_compressed_attention": hca_ratios[0] if hca_ratios else 128},
        mlp_layer_types=["hash_moe" if i < config.num_hash_layers else "moe"
                         for i in range(config.num_hidden_layers)],
        hc_mult=config.hc_mult,
        hc_sinkhorn_iters=config.hc_sinkhorn_iters,
        hc_eps=config.hc_eps,
        swiglu_limit=config.swiglu_limit,
        sliding_window=config.sliding_window,
        o_groups=config.o_groups,
        o_lora_rank=config.o_lora_rank,
        index_n_heads=config.index_n_heads,
        index_head_dim=config.index_head_dim,
        index_topk=config.index_topk,
        num_nextn_predict_layers=config.num_nextn_predict_layers,
        rms_norm_eps=config.rms_norm_eps,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        partial_rotary_factor=config.qk_rope_head_dim / config.head_dim,
        rope_parameters={
            "rope_type": "yarn",
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
        },
    )


# transformers attention type -> key of its compress_rates (sliding layers compress nothing).
_COMPRESSED_TYPES = ("compressed_sparse_attention", "heavily_compressed_attention")
# ModelConfig fields that a transformers config does not carry under the same name.
_DERIVED_FIELDS = {"compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_theta",
                   "compress_rope_theta", "rope_scaling", "weight_dtype", "expert_dtype"}


def config_from_transformers(raw: dict[str, Any], *, source: str = "<dict>") -> ModelConfig:
    """Build a ModelConfig from a ``DeepseekV4Config`` dict (a transformers ``config.json``).

    ``layer_types`` with ``compress_rates`` become ``compress_ratios`` (plus one sliding entry
    per MTP block), the leading ``hash_moe`` entries of ``mlp_layer_types`` give
    ``num_hash_layers``, and the ``main``/``compress`` RoPE parameters give the two bases and
    the YaRN settings. Without a ``quantization_config`` the weights are unquantized.
    """
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128,
             **(raw.get("compress_rates") or {})}
    ratio_of = {"sliding_attention": 0, **{kind: int(rates[kind]) for kind in _COMPRESSED_TYPES}}
    layer_types = raw.get("layer_types")
    if not isinstance(layer_types, list) or any(t not in ratio_of for t in layer_types):
        raise ConfigError(f"{source}: layer_types must list {sorted(ratio_of)}, got {layer_types!r}")
    mtp_blocks = int(raw.get("num_nextn_predict_layers", 1))
    mlp_types = list(raw.get("mlp_layer_types") or [])
    hash_layers = len(mlp_types) - len(list(dropwhile(lambda t: t == "hash_moe", mlp_types)))
    if "hash_moe" in mlp_types[hash_layers:]:
        raise ConfigError(f"{source}: hash_moe layers must come first in mlp_layer_types, got "
                          f"{mlp_types}")

    values: dict[str, Any] = {f.name: raw[f.name] for f in dataclasses.fields(ModelConfig)
                              if f.name in raw and f.name not in _DERIVED_FIELDS}
    values["compress_ratios"] = tuple(ratio_of[t] for t in layer_types) + (0,) * mtp_blocks
    values["num_nextn_predict_layers"] = mtp_blocks
    values["num_hash_layers"] = hash_layers
    head_dim = raw.get("head_dim", 0)
    values["qk_rope_head_dim"] = int(raw.get("qk_rope_head_dim")
                                     or round(head_dim * raw.get("partial_rotary_factor", 0)))
    rope = raw.get("rope_parameters") or {}
    main, compress = rope.get("main") or {}, rope.get("compress") or {}
    values["rope_theta"] = float(main.get("rope_theta", raw.get("rope_theta", 10000.0)))
    values["compress_rope_theta"] = float(
        compress.get("rope_theta", raw.get("compress_rope_theta", 160000.0)))
    if compress.get("rope_type") == "yarn":
        values["rope_scaling"] = RopeScaling(
            factor=float(compress["factor"]),
            original_max_position_embeddings=int(compress["original_max_position_embeddings"]),
            beta_fast=float(compress.get("beta_fast", 32.0)),
            beta_slow=float(compress.get("beta_slow", 1.0)))
    quantization = raw.get("quantization_config")
    if quantization:
        values["weight_dtype"] = "fp8"
        values["expert_dtype"] = quantization.get("expert_dtype") or raw.get("expert_dtype") or "fp4"
    else:
        values["weight_dtype"] = values["expert_dtype"] = "bf16"

    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"{source}: missing config keys {missing} (transformers naming)")
    try:
        return ModelConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def is_transformers_config(raw: object) -> bool:
    """Tell a transformers ``config.json`` (``layer_types``) from the released one."""
    return isinstance(raw, dict) and "layer_types" in raw and "compress_ratios" not in raw

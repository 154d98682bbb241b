"""Tensor names, shapes and dtypes of a DeepSeek-V4 checkpoint in the released layout.

Names are DeepSeek's own inference names (``layers.{i}.attn.wq_a.weight``, ``mtp.0.e_proj.weight``
...), which the released safetensors shards use. Storage dtypes follow the released checkpoints:

* dense linears FP8 e4m3 with a ``.scale`` of UE8M0 bytes per 128x128 block, or bf16 without a
  scale when ``weight_dtype == "bf16"``;
* routed experts FP4 e2m1 packed two per byte (int8 ``[out, in/2]``) with a UE8M0 ``.scale``
  per 32 values, or FP8 / bf16 as ``expert_dtype`` sets;
* embedding, head, RMSNorm weights, compressor projections, indexer ``weights_proj`` and the
  router weight in bf16; attention sinks, compressor position biases, hyper-connection
  parameters and the router bias in fp32; the hash-routing table ``tid2eid`` in int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.config import ModelConfig

from .quant import FP4_BLOCK, FP8_BLOCK

SCALE_SUFFIX = ".scale"


@dataclass(frozen=True)
class TensorSpec:
    """Stored shape and dtype of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Builder:
    """Collects specs in a fixed order: top-level tensors, then each layer, then MTP blocks."""

    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.specs[name] = TensorSpec(tuple(int(n) for n in shape), dtype)

    def linear(self, name: str, out_features: int, in_features: int, storage: str) -> None:
        """Add ``name.weight`` (and ``name.scale``) for a linear stored as fp8, fp4 or bf16."""
        if storage == "bf16":
            self.add(f"{name}.weight", (out_features, in_features), torch.bfloat16)
        elif storage == "fp8":
            self.add(f"{name}.weight", (out_features, in_features), torch.float8_e4m3fn)
            self.add(f"{name}{SCALE_SUFFIX}",
                     (math.ceil(out_features / FP8_BLOCK), math.ceil(in_features / FP8_BLOCK)),
                     torch.float8_e8m0fnu)
        elif storage == "fp4":
            if in_features % FP4_BLOCK:
                raise ValueError(
                    f"{name}: FP4 storage needs in_features divisible by {FP4_BLOCK}, got "
                    f"{in_features}; use expert_dtype 'fp8' or 'bf16' for this config")
            self.add(f"{name}.weight", (out_features, in_features // 2), torch.int8)
            self.add(f"{name}{SCALE_SUFFIX}", (out_features, in_features // FP4_BLOCK),
                     torch.float8_e8m0fnu)
        else:
            raise ValueError(f"{name}: unknown storage format {storage!r} (fp8, fp4 or bf16)")


def _add_hyper_connection(builder: _Builder, prefix: str, site: str, config: ModelConfig) -> None:
    # One mixing site produces pre [hc], post [hc] and comb [hc, hc] from the flattened streams.
    streams = config.hc_mult
    mix = (2 + streams) * streams
    builder.add(f"{prefix}hc_{site}_fn", (mix, streams * config.hidden_size), torch.float32)
    builder.add(f"{prefix}hc_{site}_base", (mix,), torch.float32)
    builder.add(f"{prefix}hc_{site}_scale", (3,), torch.float32)


def _add_head_collapse(builder: _Builder, prefix: str, config: ModelConfig) -> None:
    streams = config.hc_mult
    builder.add(f"{prefix}hc_head_fn", (streams, streams * config.hidden_size), torch.float32)
    builder.add(f"{prefix}hc_head_base", (streams,), torch.float32)
    builder.add(f"{prefix}hc_head_scale", (1,), torch.float32)


def _add_compressor(builder: _Builder, prefix: str, ratio: int, width: int,
                    config: ModelConfig) -> None:
    # Ratio 4 pools overlapping windows, so it projects two halves (2 * width) per token.
    coefficient = 2 if ratio == 4 else 1
    bf16 = torch.bfloat16
    builder.add(f"{prefix}wkv.weight", (coefficient * width, config.hidden_size), bf16)
    builder.add(f"{prefix}wgate.weight", (coefficient * width, config.hidden_size), bf16)
    builder.add(f"{prefix}ape", (ratio, coefficient * width), torch.float32)
    builder.add(f"{prefix}norm.weight", (width,), bf16)


def _add_attention(builder: _Builder, prefix: str, ratio: int, config: ModelConfig) -> None:
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    dense = config.weight_dtype
    bf16 = torch.bfloat16
    builder.linear(f"{prefix}wq_a", config.q_lora_rank, d, dense)
    builder.add(f"{prefix}q_norm.weight", (config.q_lora_rank,), bf16)
    builder.linear(f"{prefix}wq_b", heads * head_dim, config.q_lora_rank, dense)
    builder.linear(f"{prefix}wkv", head_dim, d, dense)
    builder.add(f"{prefix}kv_norm.weight", (head_dim,), bf16)
    builder.linear(f"{prefix}wo_a", config.o_groups * config.o_lora_rank,
                   heads * head_dim // config.o_groups, dense)
    builder.linear(f"{prefix}wo_b", d, config.o_groups * config.o_lora_rank, dense)
    builder.add(f"{prefix}attn_sink", (heads,), torch.float32)
    if ratio == 0:
        return
    _add_compressor(builder, f"{prefix}compressor.", ratio, head_dim, config)
    if ratio == 4:
        index_prefix = f"{prefix}indexer."
        builder.linear(f"{index_prefix}wq_b", config.index_n_heads * config.index_head_dim,
                       config.q_lora_rank, dense)
        builder.add(f"{index_prefix}weights_proj.weight", (config.index_n_heads, d), bf16)
        _add_compressor(builder, f"{index_prefix}compressor.", ratio, config.index_head_dim,
                        config)


def _add_moe(builder: _Builder, prefix: str, hash_routed: bool, config: ModelConfig) -> None:
    d, width, experts = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    builder.add(f"{prefix}gate.weight", (experts, d), torch.bfloat16)
    if hash_routed:
        builder.add(f"{prefix}gate.tid2eid", (config.vocab_size, config.num_experts_per_tok),
                    torch.int64)
    else:
        builder.add(f"{prefix}gate.bias", (experts,), torch.float32)
    for expert in range(experts):
        expert_prefix = f"{prefix}experts.{expert}."
        builder.linear(f"{expert_prefix}w1", width, d, config.expert_dtype)
        builder.linear(f"{expert_prefix}w2", d, width, config.expert_dtype)
        builder.linear(f"{expert_prefix}w3", width, d, config.expert_dtype)
    if config.n_shared_experts:
        shared = config.n_shared_experts * width
        builder.linear(f"{prefix}shared_experts.w1", shared, d, config.weight_dtype)
        builder.linear(f"{prefix}shared_experts.w2", d, shared, config.weight_dtype)
        builder.linear(f"{prefix}shared_experts.w3", shared, d, config.weight_dtype)


def _add_block(builder: _Builder, prefix: str, ratio: int, hash_routed: bool,
               config: ModelConfig) -> None:
    """Add the tensors of one transformer block (a main layer or the shared part of MTP)."""
    d = config.hidden_size
    builder.add(f"{prefix}attn_norm.weight", (d,), torch.bfloat16)
    builder.add(f"{prefix}ffn_norm.weight", (d,), torch.bfloat16)
    _add_hyper_connection(builder, prefix, "attn", config)
    _add_hyper_connection(builder, prefix, "ffn", config)
    _add_attention(builder, f"{prefix}attn.", ratio, config)
    _add_moe(builder, f"{prefix}ffn.", hash_routed, config)


def layer_tensors(config: ModelConfig, layer: int) -> dict[str, TensorSpec]:
    """Return the specs of main layer ``layer`` (names start with ``layers.{layer}.``)."""
    builder = _Builder()
    _add_block(builder, f"layers.{layer}.", config.layer_ratios[layer],
               layer < config.num_hash_layers, config)
    return builder.specs


def mtp_tensors(config: ModelConfig, index: int) -> dict[str, TensorSpec]:
    """Return the specs of MTP block ``index`` (names start with ``mtp.{index}.``)."""
    builder = _Builder()
    prefix = f"mtp.{index}."
    d = config.hidden_size
    # The MTP block routes by learned scores, never by token id.
    _add_block(builder, prefix, config.mtp_ratios[index], False, config)
    builder.linear(f"{prefix}e_proj", d, d, config.weight_dtype)
    builder.linear(f"{prefix}h_proj", d, d, config.weight_dtype)
    builder.add(f"{prefix}enorm.weight", (d,), torch.bfloat16)
    builder.add(f"{prefix}hnorm.weight", (d,), torch.bfloat16)
    builder.add(f"{prefix}norm.weight", (d,), torch.bfloat16)
    _add_head_collapse(builder, prefix, config)
    return builder.specs


def top_level_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    """Return the specs outside the blocks: embedding, final norm, head collapse and head."""
    builder = _Builder()
    d = config.hidden_size
    builder.add("embed.weight", (config.vocab_size, d), torch.bfloat16)
    builder.add("norm.weight", (d,), torch.bfloat16)
    _add_head_collapse(builder, "", config)
    builder.add("head.weight", (config.vocab_size, d), torch.bfloat16)
    return builder.specs


def expected_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    """Return every tensor of a checkpoint of ``config``: official name -> stored shape and dtype.

    The order is top-level tensors, then layer by layer, then the MTP blocks.
    """
    specs = dict(top_level_tensors(config))
    for layer in range(config.num_hidden_layers):
        specs.update(layer_tensors(config, layer))
    for index in range(config.num_nextn_predict_layers):
        specs.update(mtp_tensors(config, index))
    return specs


def scale_name(weight_name: str) -> str | None:
    """Return the ``.scale`` name beside a ``.weight`` name (None for other names)."""
    if weight_name.endswith(".weight"):
        return weight_name.removesuffix(".weight") + SCALE_SUFFIX
    return None

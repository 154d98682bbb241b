"""Model configuration of DeepSeek-V4: one dataclass, loaded from either released naming.

Field names follow the Hugging Face ``config.json`` of the released checkpoints. DeepSeek's own
inference code names the same values differently (``dim``, ``n_layers``, ``window_size``, ...);
``ModelConfig.from_dict`` accepts both and gives equal configs for the two files of one model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Inference-code key -> Hugging Face key, for keys that are a plain rename.
_INFERENCE_RENAMES = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
}
# Inference-code keys that form the YaRN block of the Hugging Face naming.
_INFERENCE_ROPE_KEYS = {
    "rope_factor": "factor",
    "original_seq_len": "original_max_position_embeddings",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
}
# Keys that both namings may carry and that change nothing in dsv4.
_IGNORED_KEYS = {
    "architectures", "attention_bias", "attention_dropout", "hidden_act", "initializer_range",
    "model_type", "topk_method", "torch_dtype", "transformers_version", "use_cache",
    "auto_map", "_name_or_path", "n_routed_experts_score", "max_batch_size",
    "pad_token_id", "first_k_dense_replace", "kv_lora_rank",
}


@dataclass(frozen=True)
class RopeScaling:
    """YaRN settings, applied only on layers with a compressor (ratio > 0)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Every dimension and constant of a DeepSeek-V4 model (see the released ``config.json``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # per query head and for the single shared K=V head
    qk_rope_head_dim: int  # the LAST this-many dims of each head are rotated (interleaved pairs)
    q_lora_rank: int
    o_groups: int  # heads are split into this many contiguous groups for the output projection
    o_lora_rank: int  # per-group intermediate width of the output projection
    sliding_window: int  # window length in tokens, the current token included
    # One entry per layer, then one per MTP block: 0 = sliding only, 4 = CSA, other = HCA.
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    moe_intermediate_size: int  # width of every routed and shared expert
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    num_hash_layers: int = 3  # the first this-many layers route by token id (tid2eid)
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0  # gate clamped above, up clamped both sides; 0 disables
    hc_mult: int = 4  # hyper-connection residual streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # sliding-only layers and the MTP block, never YaRN
    compress_rope_theta: float = 160000.0  # every layer with a compressor, always with YaRN
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    num_key_value_heads: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    # Storage of the released weights: FP8 e4m3 dense linears with 128x128 UE8M0 block scales,
    # routed experts FP4 e2m1 (or FP8 after DeepSeek's `--expert-dtype fp8` conversion).
    # "bf16" means an unquantized checkpoint.
    weight_dtype: str = "fp8"
    expert_dtype: str = "fp4"

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ derived sizes

    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compress ratio of each main layer (the MTP entries excluded)."""
        return self.compress_ratios[: self.num_hidden_layers]

    @property
    def mtp_ratios(self) -> tuple[int, ...]:
        return self.compress_ratios[self.num_hidden_layers:]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    def layer_kind(self, ratio: int) -> str:
        """Name of the attention type for a compress ratio: "sliding", "csa" or "hca"."""
        if ratio == 0:
            return "sliding"
        return "csa" if ratio == 4 else "hca"

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        def fail(name: str, value: Any, expected: str) -> None:
            raise ConfigError(f"invalid config value {name}={value!r}: expected {expected}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
                     "index_n_heads", "index_head_dim", "index_topk", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, value, "a positive integer")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "a positive even integer")
        if self.qk_rope_head_dim > self.head_dim:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, f"at most head_dim={self.head_dim}")
        if self.qk_rope_head_dim > self.index_head_dim:
            fail("qk_rope_head_dim", self.qk_rope_head_dim,
                 f"at most index_head_dim={self.index_head_dim} (index keys are rotated too)")
        if self.num_attention_heads % self.o_groups:
            fail("o_groups", self.o_groups,
                 f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.num_key_value_heads != 1:
            fail("num_key_value_heads", self.num_key_value_heads, "1 (DeepSeek-V4 has one K=V head)")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok,
                 f"at most n_routed_experts={self.n_routed_experts}")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            fail("num_hash_layers", self.num_hash_layers, f"0..num_hidden_layers={self.num_hidden_layers}")
        if self.scoring_func != "sqrtsoftplus":
            fail("scoring_func", self.scoring_func, "'sqrtsoftplus'")
        if self.n_shared_experts not in (0, 1):
            fail("n_shared_experts", self.n_shared_experts, "0 or 1")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", self.num_nextn_predict_layers, "0 or more")
        needed = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != needed:
            fail("compress_ratios", list(self.compress_ratios),
                 f"{needed} entries (num_hidden_layers + num_nextn_predict_layers)")
        for i, ratio in enumerate(self.compress_ratios):
            if not isinstance(ratio, int) or ratio < 0 or ratio == 1:
                fail(f"compress_ratios[{i}]", ratio, "0 (sliding only) or a ratio >= 2")
        for i, ratio in enumerate(self.mtp_ratios):
            if ratio != 0:
                fail(f"compress_ratios[{self.num_hidden_layers + i}]", ratio,
                     "0: the MTP block is sliding-window only")
        if self.weight_dtype not in ("fp8", "bf16"):
            fail("weight_dtype", self.weight_dtype, "'fp8' or 'bf16'")
        if self.expert_dtype not in ("fp4", "fp8", "bf16"):
            fail("expert_dtype", self.expert_dtype, "'fp4', 'fp8' or 'bf16'")

    def check_reference_numerics(self) -> None:
        """Raise ConfigError unless the block sizes of the FP8/FP4 simulation fit this config.

        Activation quantization works on 128-wide blocks along every FP8 matmul input, the KV
        rounding on 64-wide blocks of the non-RoPE dims, and the indexer's Hadamard rotation and
        FP4 rounding need a power-of-two ``index_head_dim`` that is a multiple of 32.
        """
        inputs = {
            "hidden_size": self.hidden_size,
            "q_lora_rank": self.q_lora_rank,
            "o_groups * o_lora_rank": self.o_groups * self.o_lora_rank,
            "moe_intermediate_size": self.moe_intermediate_size,
        }
        for name, value in inputs.items():
            if value % 128:
                raise ConfigError(
                    f"reference numerics need {name} to be a multiple of 128 (FP8 activation "
                    f"blocks), got {value}; use numerics='plain' or change the config")
        if self.nope_head_dim % 64:
            raise ConfigError(
                f"reference numerics need head_dim - qk_rope_head_dim to be a multiple of 64 "
                f"(FP8 KV blocks), got {self.nope_head_dim}; use numerics='plain' or change the config")
        d = self.index_head_dim
        if d % 32 or d & (d - 1):
            raise ConfigError(
                f"reference numerics need index_head_dim to be a power of two and a multiple of "
                f"32 (Hadamard rotation, FP4 blocks), got {d}; use numerics='plain' or change the config")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "<dict>") -> "ModelConfig":
        """Build a config from a Hugging Face or DeepSeek-inference style dict.

        Unknown keys and missing required keys raise ConfigError naming them and ``source``.
        ``compress_ratios`` longer than layers + MTP blocks (later releases append drafter
        entries) is cut to that length.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        inference_naming = "dim" in raw or "n_layers" in raw
        values: dict[str, Any] = {}
        rope: dict[str, Any] = {}
        unknown: list[str] = []
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key in _IGNORED_KEYS:
                continue
            if key == "quantization_config":
                values.update(_parse_quantization(value, source))
            elif key == "rope_scaling":
                if value is not None:
                    rope.update(_parse_rope_scaling(value, source))
            elif key in _INFERENCE_ROPE_KEYS:
                rope[_INFERENCE_ROPE_KEYS[key]] = value
            elif key in _INFERENCE_RENAMES:
                values[_INFERENCE_RENAMES[key]] = value
            elif key == "dtype" and inference_naming:
                values["weight_dtype"] = _parse_weight_dtype(value, source)
            elif key == "scale_fmt" and inference_naming:
                if value not in ("ue8m0", None):
                    raise ConfigError(f"{source}: scale_fmt={value!r} is not supported (expected 'ue8m0')")
            elif key == "expert_dtype":
                if value is not None:
                    values["expert_dtype"] = value
            elif key in known and key not in ("rope_scaling", "weight_dtype"):
                values[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {sorted(unknown)}; "
                              f"is this a DeepSeek-V4 config.json?")
        if rope:
            values["rope_scaling"] = RopeScaling(**{k: rope[k] for k in rope})
        if "weight_dtype" not in values:
            # No quantization block: an unquantized (bf16) checkpoint, experts included.
            values["weight_dtype"] = "bf16"
            values.setdefault("expert_dtype", "bf16")

        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            naming = "DeepSeek inference" if inference_naming else "Hugging Face"
            raise ConfigError(f"{source}: missing config keys {missing} ({naming} naming)")

        ratios = values["compress_ratios"]
        if not isinstance(ratios, (list, tuple)):
            raise ConfigError(f"{source}: compress_ratios must be a list, got {ratios!r}")
        n_layers = values["num_hidden_layers"]
        if "num_nextn_predict_layers" not in values:
            values["num_nextn_predict_layers"] = max(0, min(1, len(ratios) - n_layers))
        keep = n_layers + values["num_nextn_predict_layers"]
        values["compress_ratios"] = tuple(int(r) for r in ratios[:keep])
        for name in ("rope_theta", "compress_rope_theta", "routed_scaling_factor",
                     "swiglu_limit", "hc_eps", "rms_norm_eps"):
            if name in values:
                values[name] = float(values[name])
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config in Hugging Face ``config.json`` form, as the released checkpoints have it."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
        }
        for f in dataclasses.fields(self):
            if f.name in ("weight_dtype", "rope_scaling"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        out["torch_dtype"] = "bfloat16"
        if self.weight_dtype == "fp8":
            out["quantization_config"] = {
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
            }
        else:
            out.pop("expert_dtype")
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """A config file or value that dsv4 cannot use; the message names the key and the fix."""


def _parse_quantization(value: Any, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {value!r}")
    method = value.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"{source}: quantization_config.quant_method={method!r} is not "
                          f"supported (expected 'fp8')")
    block = value.get("weight_block_size", [128, 128])
    if list(block) != [128, 128]:
        raise ConfigError(f"{source}: quantization_config.weight_block_size={block!r} is not "
                          f"supported (expected [128, 128])")
    if value.get("scale_fmt", "ue8m0") != "ue8m0":
        raise ConfigError(f"{source}: quantization_config.scale_fmt={value.get('scale_fmt')!r} "
                          f"is not supported (expected 'ue8m0')")
    out: dict[str, Any] = {"weight_dtype": "fp8"}
    if value.get("expert_dtype") is not None:
        out["expert_dtype"] = value["expert_dtype"]
    return out


def _parse_rope_scaling(value: Any, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {value!r}")
    kind = value.get("type", value.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (expected 'yarn')")
    allowed = {f.name for f in dataclasses.fields(RopeScaling)}
    out = {}
    for key, item in value.items():
        if key in ("type", "rope_type"):
            continue
        if key in ("mscale", "mscale_all_dim", "attention_factor"):
            # NOTE: DeepSeek-V4 never scales cos/sin or the softmax by the YaRN magnitude;
            # a value here is ignored rather than applied.
            continue
        if key not in allowed:
            raise ConfigError(f"{source}: unknown rope_scaling key {key!r}")
        out[key] = float(item) if key != "original_max_position_embeddings" else int(item)
    return out


def _parse_weight_dtype(value: Any, source: str) -> str:
    if value in ("fp8", "bf16"):
        return value
    raise ConfigError(f"{source}: dtype={value!r} is not supported (expected 'fp8' or 'bf16')")

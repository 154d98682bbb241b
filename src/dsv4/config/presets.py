"""Named model configs: the released Flash and Pro, the demo ``tiny`` and two test configs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from dsv4.config.model_config import ConfigError, ModelConfig

def _small(**changes: Any) -> ModelConfig:
    """A small config in the shape of the released models, for tests and the demo model."""
    base: dict[str, Any] = dict(
        vocab_size=129280, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
        head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128,
        sliding_window=128, compress_ratios=(0, 4, 128, 4, 0), index_n_heads=4,
        index_head_dim=64, index_topk=64, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, num_hash_layers=1, routed_scaling_factor=1.5,
    )
    base.update(changes)
    return ModelConfig(**base)


def preset_names() -> list[str]:
    return ["flash", "pro", "tiny", "test-mix", "test-window"]


def load_preset(name: str) -> ModelConfig:
    """Return a named config: the released ``flash`` and ``pro``, the demo ``tiny`` or a test one.

    ``tiny`` is the embedded default model: the real 129,280-token vocabulary, the layer kinds
    of the released models (sliding, CSA, HCA, MTP) at a size that runs on a laptop CPU.
    ``test-mix`` is smaller still (vocab 512, window 16, HCA ratio 8, top-k 2) so that every
    boundary is crossed within a few dozen tokens; ``test-window`` adds a 4-layer mix with
    window 8.
    """
    if name in ("flash", "pro"):
        text = resources.files("dsv4.configs").joinpath(f"deepseek-v4-{name}.config.json").read_text()
        return ModelConfig.from_dict(json.loads(text), source=f"preset {name}")
    if name == "tiny":
        return _small()
    if name == "test-mix":
        return _small(vocab_size=512, sliding_window=16, compress_ratios=(0, 4, 8, 4, 0),
                      index_topk=2, index_n_heads=4, num_hash_layers=2)
    if name == "test-window":
        return _small(vocab_size=512, sliding_window=8, num_hidden_layers=5,
                      compress_ratios=(4, 0, 8, 4, 16, 0), index_topk=3, index_n_heads=2,
                      num_hash_layers=1)
    raise ConfigError(f"unknown config preset {name!r}; choose one of {preset_names()} "
                      f"or pass a path to a config.json")


def resolve_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name, a ``config.json`` path, or a checkpoint directory holding one."""
    text = str(name_or_path)
    if text in preset_names():
        return load_preset(text)
    path = Path(text)
    if path.exists():
        return ModelConfig.from_file(path)
    raise ConfigError(f"{text!r} is neither a config preset ({', '.join(preset_names())}) "
                      f"nor an existing config.json or checkpoint directory")

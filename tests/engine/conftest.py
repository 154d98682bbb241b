"""Shared fixtures of the engine tests: small random-weight models built in memory."""

from __future__ import annotations

import pytest
import torch

from dsv4.config import ModelConfig, load_preset
from dsv4.model import quant
from dsv4.model.layout import expected_tensors
from dsv4.model.loading import build_from_tensors
from dsv4.model.transformer import Transformer


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random checkpoint tensors of ``config`` under the official names and stored dtypes.

    Linear weights are N(0, fan_in^-1/2) before quantization, norm weights are near 1, and the
    mixing parameters are small, so activations stay finite over a few hundred positions.
    """
    generator = torch.Generator().manual_seed(seed)
    specs = expected_tensors(config)
    tensors: dict[str, torch.Tensor] = {}

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    for name, spec in specs.items():
        if name in tensors or name.endswith(".scale"):
            continue
        shape = spec.shape
        scale_spec = specs.get(name.removesuffix(".weight") + ".scale")
        if scale_spec is not None and spec.dtype == torch.float8_e4m3fn:
            weight = normal(*shape, std=shape[1] ** -0.5)
            tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = quant.quantize_fp8_blocks(weight)
        elif scale_spec is not None and spec.dtype == torch.int8:
            logical = (shape[0], shape[1] * 2)
            weight = normal(*logical, std=logical[1] ** -0.5)
            tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = quant.quantize_fp4(weight)
        elif name.endswith("tid2eid"):
            tensors[name] = torch.randint(0, config.n_routed_experts, shape, generator=generator)
        elif "norm" in name:
            tensors[name] = (1.0 + normal(*shape, std=0.1)).to(spec.dtype)
        elif name.endswith("_base") or name.endswith("_scale") or name.endswith("attn_sink"):
            tensors[name] = normal(*shape, std=0.5).to(spec.dtype)
        elif name.endswith("ape") or name.endswith("gate.bias"):
            tensors[name] = normal(*shape, std=0.5).to(spec.dtype)
        elif name == "embed.weight":
            tensors[name] = normal(*shape, std=1.0).to(spec.dtype)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            tensors[name] = normal(*shape, std=fan_in ** -0.5).to(spec.dtype)
    return tensors


def random_model(preset: str | ModelConfig, numerics: str = "plain", seed: int = 0) -> Transformer:
    config = load_preset(preset) if isinstance(preset, str) else preset
    tensors = random_tensors(config, seed)
    return build_from_tensors(config, tensors.__getitem__, numerics=numerics, dtype=torch.float32)


@pytest.fixture(scope="session")
def models():
    """Cached random models by (preset, numerics)."""
    cache: dict[tuple[str, str], Transformer] = {}

    def get(preset: str = "test-mix", numerics: str = "plain") -> Transformer:
        key = (preset, numerics)
        if key not in cache:
            cache[key] = random_model(preset, numerics)
        return cache[key]

    return get

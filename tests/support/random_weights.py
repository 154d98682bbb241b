"""Random weights for small configs, in official names and stored dtypes (test helper)."""

from __future__ import annotations

import torch

from dsv4.config import ModelConfig
from dsv4.model import quant
from dsv4.model.layout import expected_tensors


def random_official_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected_tensors(config)`` with values that keep activations O(1).

    Quantized linears are drawn in float32 and quantized with the project's own quantizers,
    so their dequantized values are exactly what both implementations see.
    """
    gen = torch.Generator().manual_seed(seed)
    specs = expected_tensors(config)
    out: dict[str, torch.Tensor] = {}

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    for name, spec in specs.items():
        if name.endswith(".scale"):
            continue
        shape = spec.shape
        base = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            rows = torch.rand(shape[0], config.n_routed_experts, generator=gen).argsort(-1)
            out[name] = rows[:, : shape[1]].contiguous().to(torch.int64)
        elif "hc_" in name and name.endswith("_fn"):
            out[name] = normal(shape, 0.5 / shape[-1] ** 0.5)
        elif "hc_" in name and name.endswith("_base"):
            out[name] = normal(shape, 0.5)
        elif "hc_" in name and name.endswith("_scale"):
            out[name] = 0.5 + torch.rand(shape, generator=gen) * 0.5
        elif base == "attn_sink":
            out[name] = normal(shape, 1.0)
        elif base == "ape":
            out[name] = normal(shape, 0.5)
        elif base == "bias":
            out[name] = normal(shape, 0.1)
        elif name.endswith("norm.weight"):
            out[name] = (1 + normal(shape, 0.05)).to(spec.dtype)
        elif name == "embed.weight":
            out[name] = normal(shape, 1.0).to(spec.dtype)
        else:  # a linear weight [out, in] (FP4 weights are stored [out, in / 2])
            fan_in = shape[1] * (2 if spec.dtype == torch.int8 else 1)
            logical = normal((shape[0], fan_in), fan_in ** -0.5)
            if spec.dtype == torch.float8_e4m3fn:
                out[name], out[name[: -len(".weight")] + ".scale"] = quant.quantize_fp8_blocks(logical)
            elif spec.dtype == torch.int8:
                out[name], out[name[: -len(".weight")] + ".scale"] = quant.quantize_fp4(logical)
            else:
                out[name] = logical.to(spec.dtype)
    missing = set(specs) - set(out)
    assert not missing, f"random weights missing {sorted(missing)}"
    return out


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 copies of the logical weights (scales folded in, scale tensors dropped)."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".scale"):
            continue
        scale = tensors.get(name[: -len(".weight")] + ".scale") if name.endswith(".weight") else None
        if scale is not None and tensor.dtype == torch.float8_e4m3fn:
            out[name] = quant.dequantize_fp8_blocks(tensor, scale, dtype=torch.float32)
        elif scale is not None and tensor.dtype == torch.int8:
            out[name] = quant.dequantize_fp4(tensor, scale, dtype=torch.float32)
        elif tensor.is_floating_point():
            out[name] = tensor.float()
        else:
            out[name] = tensor
    return out

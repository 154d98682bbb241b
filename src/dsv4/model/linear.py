"""Linear layers whose weights stay in their checkpoint format (FP8, FP4 or plain) in memory.

A quantized weight is dequantized to the compute dtype inside each matmul and dropped after it,
so a model never holds a bf16 copy of its FP8/FP4 weights. In ``reference`` numerics the input
of every FP8/FP4 matmul is first rounded through FP8 e4m3 in 128-wide blocks with power-of-two
scales, as DeepSeek's deployment kernels do; ``plain`` numerics skip that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model import quant

# Storage formats of a weight: "fp8" (e4m3 + 128x128 UE8M0 scales), "fp4" (two e2m1 per int8
# byte along the input dim + one UE8M0 scale per 32 inputs), "bf16" (no scale).
WEIGHT_FORMATS = ("fp8", "fp4", "bf16")


class Numerics:
    """Which quantization points a forward reproduces: "reference" or "plain"."""

    def __init__(self, mode: str = "reference"):
        if mode not in ("reference", "plain"):
            raise ValueError(f"numerics must be 'reference' or 'plain', got {mode!r}")
        self.mode = mode

    @property
    def reference(self) -> bool:
        return self.mode == "reference"

    def __repr__(self) -> str:
        return f"Numerics({self.mode!r})"


class QuantLinear(nn.Module):
    """y = x W^T with W kept as stored: ``weight`` (and ``scale``) carry the checkpoint's names.

    Shapes: fp8 weight [out, in] float8_e4m3fn with scale [ceil(out/128), ceil(in/128)];
    fp4 weight [out, in/2] int8 with scale [out, in/32]; bf16 weight [out, in] and no scale.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, numerics: Numerics):
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.numerics = numerics
        if fmt == "fp8":
            weight = torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn)
            scale = torch.zeros(-(-out_features // 128), -(-in_features // 128), dtype=torch.float8_e8m0fnu)
        elif fmt == "fp4":
            if in_features % 32:
                raise ValueError(f"FP4 weights need in_features to be a multiple of 32, got {in_features}")
            weight = torch.zeros(out_features, in_features // 2, dtype=torch.int8)
            scale = torch.zeros(out_features, in_features // 32, dtype=torch.float8_e8m0fnu)
        else:
            weight = torch.zeros(out_features, in_features, dtype=torch.bfloat16)
            scale = None
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self._dequantized: torch.Tensor | None = None  # optional cache, see cache_dequantized

    def cache_dequantized(self, dtype: torch.dtype) -> int:
        """Keep the dequantized weight in ``dtype`` from now on; returns the bytes it takes.

        Results are bitwise the same as dequantizing per call. Only worth it for small models:
        the cache costs the weight's full size in ``dtype``.
        """
        self._dequantized = None
        self._dequantized = self.dequantized_weight(dtype)
        return self._dequantized.numel() * self._dequantized.element_size()

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The logical [out, in] weight in ``dtype`` (a fresh tensor for quantized formats)."""
        if self._dequantized is not None and self._dequantized.dtype == dtype:
            return self._dequantized
        if self.fmt == "fp8":
            return quant.dequantize_fp8_blocks(self.weight, self.scale, dtype=dtype)
        if self.fmt == "fp4":
            return quant.dequantize_fp4(self.weight, self.scale, dtype=dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt != "bf16" and self.numerics.reference:
            x = quant.fp8_round_trip(x, 128)
        return F.linear(x, self.dequantized_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}"


class PlainLinear(nn.Module):
    """A linear layer stored unquantized (bf16 in checkpoints), computed in a chosen dtype.

    ``compute_dtype`` None means the input's dtype; the compressor and the router ask for
    float32 because DeepSeek computes them in float32.
    """

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.bfloat16),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        return F.linear(x.to(dtype), self.weight.to(dtype))

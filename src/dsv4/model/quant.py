"""Quantized number formats of DeepSeek-V4 checkpoints and the reference numerics.

Formats (all decoding is exact, because every scale is a power of two):

* UE8M0 scale: one unsigned byte ``b`` meaning ``2**(b - 127)``; byte 255 is NaN and invalid.
* FP8 e4m3 dense weights with one UE8M0 scale per 128x128 block of ``[out, in]``.
* FP4 e2m1 routed-expert weights packed two per byte along ``in`` (the low nibble contains the
  even-indexed element), with one UE8M0 scale per 32 consecutive values of a row.

The ``*_round_trip`` functions quantize and dequantize at once. They simulate the activation
and cache quantization points of DeepSeek's reference inference code.
"""

from __future__ import annotations

import math

import torch

FP8_BLOCK = 128  # weight block edge of FP8 dense linears
FP4_BLOCK = 32  # values per scale of FP4 routed experts
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP4_MAX = 6.0  # largest e2m1 value
UE8M0_BIAS = 127
UE8M0_NAN = 255

# e2m1 code (sign bit 3, exponent bits 2..1, mantissa bit 0) -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Rounding |x| to e2m1 works on 4|x|, where every midpoint between neighbouring e2m1 values
# (0.25, 0.75, ..., 5) becomes an integer. Inside an open interval (f, f + 1) the nearest code
# is the count of midpoints <= f. On an integer f that is a midpoint the even code of the two
# neighbours wins (round half to even).
_E2M1_MIDPOINTS_X4 = (1, 3, 5, 7, 10, 14, 20)
_E2M1_MAX_X4 = 24


def _e2m1_code_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    inside, on_integer = [], []
    for f in range(_E2M1_MAX_X4 + 1):
        below = sum(1 for m in _E2M1_MIDPOINTS_X4 if m < f)
        inside.append(sum(1 for m in _E2M1_MIDPOINTS_X4 if m <= f))
        if f in _E2M1_MIDPOINTS_X4:
            on_integer.append(below if below % 2 == 0 else below + 1)
        else:
            on_integer.append(below)
    return tuple(inside), tuple(on_integer)


_E2M1_CODE_INSIDE, _E2M1_CODE_ON_INTEGER = _e2m1_code_tables()


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """View a UE8M0 scale tensor (``float8_e8m0fnu`` or ``uint8``) as its raw bytes."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return scale
    raise TypeError(f"UE8M0 scale must be float8_e8m0fnu or uint8, got {scale.dtype}")


def ue8m0_to_float(scale: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Decode UE8M0 scale bytes to float32 powers of two, ``2**(b - 127)``.

    Raises ``ValueError`` for byte 255 (NaN); ``name`` labels the tensor in that message.
    """
    raw = _scale_bytes(scale)
    if bool((raw == UE8M0_NAN).any()):
        count = int((raw == UE8M0_NAN).sum())
        label = f"scale tensor {name!r}" if name else "UE8M0 scale tensor"
        raise ValueError(
            f"{label} contains {count} NaN byte(s) (255); a valid UE8M0 scale is a byte "
            "0..254 meaning 2**(byte - 127). The checkpoint is corrupt: re-download or "
            "rewrite it.")
    # Build the float32 bit pattern directly so every value is exact: byte b >= 1 is the
    # normal number with biased exponent b, and byte 0 (2**-127) is the subnormal 0x00400000.
    exponent_bits = raw.to(torch.int32) << 23
    bits = torch.where(raw == 0, torch.full_like(exponent_bits, 1 << 22), exponent_bits)
    return bits.view(torch.float32)


def float_to_ue8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Encode integer base-2 exponents in [-127, 127] as ``float8_e8m0fnu`` scale bytes."""
    low, high = int(exponent.min()), int(exponent.max())
    if low < -UE8M0_BIAS or high > UE8M0_BIAS:
        raise ValueError(f"UE8M0 exponents must lie in [-127, 127], got range [{low}, {high}]")
    return (exponent.to(torch.int32) + UE8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Return the smallest integer e with ``2**e >= x`` for positive finite float ``x`` (int32).

    Uses the binary exponent (``frexp``) rather than ``log2``, so exact powers of two map to
    their own exponent without rounding error.
    """
    mantissa, exponent = torch.frexp(x.float())  # x = mantissa * 2**exponent, |mantissa| in [0.5, 1)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_rows: int,
                   block_cols: int) -> torch.Tensor:
    """Repeat a per-block tensor to ``[rows, cols]``; the last block may be partial."""
    expanded = scale.repeat_interleave(block_rows, dim=0).repeat_interleave(block_cols, dim=1)
    return expanded[:rows, :cols]


def _apply_block_factors(values: torch.Tensor, factors: torch.Tensor, block: int,
                         divide: bool = False) -> torch.Tensor:
    """Multiply (or divide) float32 ``[rows, cols]`` by one factor per ``block`` x ``block`` tile.

    Whole tiles broadcast through a 4-D view without materializing the expanded factors,
    which is several times faster than repeating them; partial edge tiles use the repeat.
    """
    rows, cols = values.shape
    if rows % block == 0 and cols % block == 0:
        tiles = values.view(rows // block, block, cols // block, block)
        broadcast = factors[:, None, :, None]
        result = tiles / broadcast if divide else tiles * broadcast
        return result.view(rows, cols)
    expanded = _expand_blocks(factors, rows, cols, block, block)
    return values / expanded if divide else values * expanded


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor,
                          dtype: torch.dtype = torch.float32, *, block: int = FP8_BLOCK,
                          name: str | None = None) -> torch.Tensor:
    """Dequantize an FP8 e4m3 weight ``[out, in]`` with UE8M0 block scales.

    ``scale`` has shape ``[ceil(out/block), ceil(in/block)]``; the last row and column block
    may be partial. Returns ``[out, in]`` in ``dtype`` (the product is formed in float32).
    """
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight {name or ''} must be 2-D [out, in], got {tuple(weight.shape)}")
    rows, cols = weight.shape
    expected = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"FP8 scale {name or ''} for weight {tuple(weight.shape)} must have shape "
            f"{expected} (one per {block}x{block} block), got {tuple(scale.shape)}")
    factors = ue8m0_to_float(scale, name)  # [out/block, in/block] float32
    return _apply_block_factors(weight.to(torch.float32), factors, block).to(dtype)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack FP4 e2m1 codes ``[..., n/2]`` (int8 or uint8, two per byte) to float32 ``[..., n]``.

    The low nibble of byte j is element 2j and the high nibble is element 2j + 1.
    """
    if packed.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"packed FP4 values must be int8 or uint8, got {packed.dtype}")
    raw = packed.view(torch.uint8).long()
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=-1)  # [256, 2]: low, high
    return pairs[raw].flatten(-2)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32, *, block: int = FP4_BLOCK,
                   name: str | None = None) -> torch.Tensor:
    """Dequantize a packed FP4 weight ``[out, in/2]`` with one UE8M0 scale per ``block`` values.

    ``scale`` has shape ``[out, in/block]``. Returns ``[out, in]`` in ``dtype``.
    """
    rows, half_cols = packed.shape
    cols = 2 * half_cols
    if cols % block != 0 or tuple(scale.shape) != (rows, cols // block):
        raise ValueError(
            f"FP4 scale {name or ''} for packed weight {tuple(packed.shape)} (logical "
            f"[{rows}, {cols}]) must have shape ({rows}, {cols // block}), got "
            f"{tuple(scale.shape)}")
    factors = ue8m0_to_float(scale, name)  # [out, in/block]
    values = unpack_fp4(packed).view(rows, cols // block, block) * factors.unsqueeze(-1)
    return values.view(rows, cols).to(dtype)


def round_to_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round float values to the nearest e2m1 code (int64 in 0..15), ties to even, saturating."""
    scaled = (x.float().abs() * 4).clamp_(max=_E2M1_MAX_X4)  # exact: times a power of two
    floor = scaled.floor()
    index = floor.long()
    inside = torch.tensor(_E2M1_CODE_INSIDE, dtype=torch.int64, device=x.device)
    on_integer = torch.tensor(_E2M1_CODE_ON_INTEGER, dtype=torch.int64, device=x.device)
    codes = torch.where(scaled == floor, on_integer[index], inside[index])
    # NaN would index out of range; callers must not pass NaN.
    return codes + 8 * (x < 0).to(torch.int64)


def _round_to_e2m1_values(x: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    return table[round_to_e2m1_codes(x)]


def quantize_fp8_blocks(weight: torch.Tensor, *, block: int = FP8_BLOCK,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[out, in]`` to FP8 e4m3 with one UE8M0 scale per ``block`` x ``block`` tile.

    The scale of a tile is the smallest power of two >= amax/448 (an all-zero tile gets
    2**-127). Returns ``(weight float8_e4m3fn [out, in], scale float8_e8m0fnu
    [ceil(out/block), ceil(in/block)])``.
    """
    rows, cols = weight.shape
    block_rows, block_cols = math.ceil(rows / block), math.ceil(cols / block)
    values = weight.float()
    if rows % block or cols % block:
        padded = values.new_zeros(block_rows * block, block_cols * block)
        padded[:rows, :cols] = values
    else:
        padded = values
    amax = padded.view(block_rows, block, block_cols, block).abs().amax(dim=(1, 3))
    exponent = ceil_log2(torch.clamp(amax / FP8_MAX, min=2.0 ** -UE8M0_BIAS))
    exponent = exponent.clamp(-UE8M0_BIAS, UE8M0_BIAS)  # [block_rows, block_cols]
    factors = torch.ldexp(torch.ones_like(amax), exponent)
    scaled = _apply_block_factors(values, factors, block, divide=True)  # exact: powers of two
    quantized = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, float_to_ue8m0(exponent)


def quantize_fp4(weight: torch.Tensor, *, block: int = FP4_BLOCK,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[out, in]`` to packed FP4 e2m1 with one UE8M0 scale per ``block`` values.

    Scale = ``2**ceil(log2(amax/6))`` with amax at least 6 * 2**-126; values round to the
    nearest e2m1 value (ties to even) and saturate at +-6. Returns ``(packed int8 [out, in/2],
    scale float8_e8m0fnu [out, in/block])``.
    """
    rows, cols = weight.shape
    if cols % block != 0:
        raise ValueError(f"FP4 quantization needs in_features divisible by {block}, got {cols}")
    groups = weight.float().view(rows, cols // block, block)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
    exponent = ceil_log2(amax / FP4_MAX)  # [out, in/block, 1]
    scaled = torch.ldexp(groups, -exponent)  # exact division by a power of two
    codes = round_to_e2m1_codes(scaled).view(rows, cols // 2, 2)  # saturates at +-6
    packed = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8).view(torch.int8)
    return packed, float_to_ue8m0(exponent.squeeze(-1))


def _split_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    size = x.shape[-1]
    if size % block != 0:
        raise ValueError(f"last dimension {size} is not a multiple of the block size {block}")
    return x.float().reshape(*x.shape[:-1], size // block, block)


def fp8_quantize_activation(x: torch.Tensor, block: int = FP8_BLOCK,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 e4m3 per ``block`` values along the last dim.

    amax = max(|x|, 1e-4) per block and scale = 2**ceil(log2(amax/448)). Returns ``(q, scale)``
    with ``q`` the e4m3 values as float32 ``[..., n]`` and ``scale`` float32 ``[..., n/block]``.
    """
    blocks = _split_blocks(x, block)  # [..., n/block, block]
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    scale = torch.ldexp(torch.ones_like(amax), ceil_log2(amax / FP8_MAX))
    quantized = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return quantized.reshape(x.shape), scale.squeeze(-1)


def fp8_round_trip(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantize to FP8 e4m3 per ``block`` values along the last dim and dequantize again.

    Same recipe as ``fp8_quantize_activation``; the result has the dtype of ``x``.
    """
    quantized, scale = fp8_quantize_activation(x, block)
    blocks = quantized.reshape(*x.shape[:-1], -1, block) * scale.unsqueeze(-1)
    return blocks.reshape(x.shape).to(x.dtype)


def fp8_round_nope(x: torch.Tensor, nope: int) -> torch.Tensor:
    """Round the first ``nope`` dims of the last axis through FP8 in 64-wide blocks and keep the
    rest (the RoPE dims) unchanged, as the deployment KV cache stores a KV vector."""
    return torch.cat((fp8_round_trip(x[..., :nope], 64), x[..., nope:]), dim=-1)


def fp4_round_trip(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Quantize to FP4 e2m1 per ``block`` values along the last dim and dequantize again.

    amax = max(|x|, 6 * 2**-126), scale = 2**ceil(log2(amax/6)), values rounded to the nearest
    e2m1 value (ties to even) and clamped to +-6. The result has the dtype of ``x``.
    """
    blocks = _split_blocks(x, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=FP4_MAX * 2.0 ** -126)
    exponent = ceil_log2(amax / FP4_MAX)
    scaled = torch.ldexp(blocks, -exponent).clamp(-FP4_MAX, FP4_MAX)
    values = torch.ldexp(_round_to_e2m1_values(scaled), exponent)
    return values.reshape(x.shape).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Apply the normalized Sylvester Walsh-Hadamard transform over the last dim.

    Computes ``x @ H_d / sqrt(d)`` with ``H_{2n} = [[H_n, H_n], [H_n, -H_n]]`` and no random
    signs, so applying it twice returns ``x``. ``d`` must be a power of two. The butterflies run
    in float32 and the result has the dtype of ``x``.
    """
    size = x.shape[-1]
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two last dimension, got {size}")
    values = x.float()
    lead = values.shape[:-1]
    half = 1
    while half < size:
        pairs = values.reshape(*lead, size // (2 * half), 2, half)
        first, second = pairs[..., 0, :], pairs[..., 1, :]
        values = torch.stack((first + second, first - second), dim=-2).reshape(*lead, size)
        half *= 2
    return (values * size ** -0.5).to(x.dtype)

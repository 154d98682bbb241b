"""Rotary position embedding of DeepSeek-V4: interleaved pairs on the last dims of a head.

Sliding-only layers (and the MTP block) rotate with ``rope_theta`` and no YaRN. Every layer with
a compressor rotates everything it rotates (queries, window keys, compressed keys, index queries
and keys) with ``compress_rope_theta`` and YaRN frequency interpolation, and never scales cos/sin
by the YaRN magnitude factor.
"""

from __future__ import annotations

import math

import torch

from dsv4.config import ModelConfig, RopeScaling


def yarn_correction_range(theta: float, rope_dim: int, scaling: RopeScaling) -> tuple[int, int]:
    """Return the YaRN ramp ends (lo, hi), counted in rotation pairs.

    Pairs below ``lo`` keep their frequency, pairs at or above ``hi`` are divided by the factor,
    and the ones between are interpolated linearly.
    """

    def correction_dim(rotations: float) -> float:
        wavelength_ratio = scaling.original_max_position_embeddings / (rotations * 2 * math.pi)
        return rope_dim * math.log(wavelength_ratio) / (2 * math.log(theta))

    lo = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(scaling.beta_slow)), rope_dim - 1)
    return lo, hi


def rope_frequencies(rope_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Angular frequency per rotation pair, [rope_dim // 2] float32, YaRN-interpolated if given.

    Computed in float32 in the same order of operations as DeepSeek's reference, so that values
    rounded later (FP8/FP4 simulation) see the same inputs.
    """
    pair = torch.arange(0, rope_dim, 2, dtype=torch.float32)
    freqs = 1.0 / (theta ** (pair / rope_dim))  # [rope_dim // 2]
    if scaling is None:
        return freqs
    lo, hi = yarn_correction_range(theta, rope_dim, scaling)
    if lo == hi:
        hi = lo + 0.001  # the reference widens an empty ramp the same way
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # share of the original frequency
    return freqs / scaling.factor * (1 - keep) + freqs * keep


def layer_frequencies(config: ModelConfig, ratio: int) -> torch.Tensor:
    """Frequencies used by a layer of the given compress ratio (0 = sliding only)."""
    if ratio == 0:
        return rope_frequencies(config.qk_rope_head_dim, config.rope_theta, None)
    return rope_frequencies(config.qk_rope_head_dim, config.compress_rope_theta, config.rope_scaling)


class RopeTable:
    """Frequencies of one layer, computed on first use per device (never at construction, so
    a model can be built on the meta device and filled from a checkpoint)."""

    def __init__(self, config: ModelConfig, ratio: int):
        self.config = config
        self.ratio = ratio
        self._cache: dict[str, torch.Tensor] = {}

    def frequencies(self, device: torch.device | str) -> torch.Tensor:
        key = str(device)
        if key not in self._cache:
            with torch.device("cpu"):
                freqs = layer_frequencies(self.config, self.ratio)
            self._cache[key] = freqs.to(device)
        return self._cache[key]


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, each [len(positions), rope_dim // 2] in ``dtype``.

    Angles are float32 products, as in DeepSeek's reference (its tables are float32 too).
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs.to(positions.device, torch.float32)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2 * cos.shape[-1]`` dims of x in interleaved pairs; returns a new tensor.

    x: [T, ..., D] with T matching cos/sin [T, R/2]; pair k is channels (D-R+2k, D-R+2k+1).
    ``inverse`` rotates by the negative angle (used to de-rotate the attention output).
    """
    rope_dim = 2 * cos.shape[-1]
    head = x[..., : x.shape[-1] - rope_dim]
    pairs = x[..., x.shape[-1] - rope_dim:].unflatten(-1, (-1, 2))  # [T, ..., R/2, 2]
    extra = x.dim() - 2  # broadcast cos/sin over the dims between T and the last one
    shape = (cos.shape[0],) + (1,) * extra + (cos.shape[-1],)
    c = cos.reshape(shape)
    s = sin.reshape(shape)
    if inverse:
        s = -s
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * c - imag * s, real * s + imag * c), dim=-1).flatten(-2)
    return torch.cat((head, rotated.to(x.dtype)), dim=-1)

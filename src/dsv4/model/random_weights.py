"""Random tensors for a DeepSeek-V4 checkpoint, chosen so a forward pass stays O(1).

Each tensor draws from its own random stream, seeded from the checkpoint seed and the tensor
name, so a tensor's values do not depend on the order or sharding in which tensors are made.

Distributions by official name:

* linear weights N(0, fan_in**-0.5) before quantization (FP8 and bf16 storage); FP4 routed
  experts get e2m1 codes drawn directly with the same overall std (see ``sample_fp4``);
* RMSNorm weights 1 + N(0, 0.05), attention sinks N(0, 1), compressor ``ape`` N(0, 0.5);
* ``hc_*_fn`` N(0, 0.05 / sqrt(fan_in)), ``hc_*_base`` N(0, 0.5), ``hc_*_scale`` 0.5 + U(0, 0.5);
* router bias N(0, 0.1), ``tid2eid`` distinct random experts per row;
* embedding N(0, 1), head N(0, hidden**-0.5).
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

from dsv4.config import ModelConfig

from .layout import SCALE_SUFFIX, TensorSpec
from .quant import FP4_BLOCK, UE8M0_BIAS, quantize_fp8_blocks

# Midpoints between neighbouring e2m1 magnitudes; |code value| above 5 rounds to 6.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TABLE_BITS = 16  # probability resolution of sampled FP4 codes: 2**-16 per packed byte


def stream_seed(seed: int, name: str) -> int:
    """Return a 63-bit seed for tensor ``name`` of a checkpoint with seed ``seed``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator,
            mean: float = 0.0) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)  # float32
    return values.mul_(std).add_(mean)


def _code_probabilities(ratio: float) -> np.ndarray:
    """Return the probability of each of the 16 e2m1 codes for round(N(0, ratio**2)).

    All mass at zero goes to code 0 (+0). Values beyond 6 saturate to code 7 / 15.
    """
    def below(t: float) -> float:  # P(|Z| * ratio <= t)
        return math.erf(t / ratio / math.sqrt(2.0))

    edges = [0.0, *_E2M1_MIDPOINTS, math.inf]
    magnitude = [below(edges[k + 1]) - below(edges[k]) for k in range(8)]
    magnitude[7] = 1.0 - below(_E2M1_MIDPOINTS[-1])
    probabilities = np.zeros(16)
    probabilities[0] = magnitude[0]
    for k in range(1, 8):
        probabilities[k] = probabilities[k + 8] = magnitude[k] / 2
    return probabilities


@functools.lru_cache(maxsize=64)
def _packed_byte_table(ratio: float) -> np.ndarray:
    """Map a uniform ``_TABLE_BITS``-bit integer to a packed byte of two independent codes."""
    probabilities = _code_probabilities(ratio)
    byte = np.arange(256)
    joint = probabilities[byte & 0x0F] * probabilities[byte >> 4]  # low nibble, high nibble
    cumulative = np.cumsum(joint)
    cumulative /= cumulative[-1]
    size = 1 << _TABLE_BITS
    quantiles = (np.arange(size) + 0.5) / size
    return np.searchsorted(cumulative, quantiles, side="right").clip(0, 255).astype(np.uint8)


def sample_fp4(shape: tuple[int, int], std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample packed FP4 weights ``[out, in/2]`` and scales ``[out, in/32]`` with std ``std``.

    Quantizing Gaussian weights with ``quantize_fp4`` took about 40 ns per value on a 2-core
    CPU, which is minutes for the 768 expert matrices of one Flash block. Codes are therefore
    drawn directly, with one table lookup per byte. Codes follow the e2m1 rounding of N(0, r**2) with r in (1.25, 2.5], as rounding
    Gaussian weights with ue8m0 group scales gives. Each 32-value group gets scale ``s`` or
    ``2s`` at random, so the values form a scale mixture whose overall std is ``std``:
    r * s = std / sqrt(2.5), because the mean square of (1, 2) is 2.5.
    """
    rows, packed_cols = shape
    groups = 2 * packed_cols // FP4_BLOCK
    code_std = std / math.sqrt(2.5)  # r * s
    base_exponent = math.ceil(math.log2(code_std / 2.5))
    table = _packed_byte_table(code_std / 2.0 ** base_exponent)

    generator = np.random.Philox(seed)
    count = rows * packed_cols
    words = math.ceil(count / 4)  # four 16-bit table indices per 64-bit random word
    raw = generator.random_raw(words + math.ceil(rows * groups / 64))
    uniform = raw[:words].view(np.uint16)[:count]
    packed = torch.from_numpy(table[uniform].reshape(rows, packed_cols)).view(torch.int8)
    doubled = np.unpackbits(raw[words:].view(np.uint8))[: rows * groups].reshape(rows, groups)
    if not -UE8M0_BIAS <= base_exponent < UE8M0_BIAS:
        raise ValueError(f"std {std} is out of the range of UE8M0 scales")
    scale_bytes = doubled + np.uint8(base_exponent + UE8M0_BIAS)  # [out, in/32] uint8
    return packed, torch.from_numpy(scale_bytes).view(torch.float8_e8m0fnu)


def _fan_in(name: str, spec: TensorSpec) -> int:
    in_features = spec.shape[-1]
    return 2 * in_features if spec.dtype == torch.int8 else in_features


def random_tensors(name: str, spec: TensorSpec, scale_spec: TensorSpec | None, seed: int,
                   config: ModelConfig) -> dict[str, torch.Tensor]:
    """Make tensor ``name`` (and its ``.scale`` when ``scale_spec`` is given) in stored form."""
    stream = stream_seed(seed, name)
    generator = torch.Generator().manual_seed(stream)
    leaf = name.rsplit(".", 1)[-1]
    shape = spec.shape

    if name == "embed.weight":
        values = torch.randn(shape, generator=generator, dtype=torch.bfloat16)
    elif name == "head.weight":
        values = torch.randn(shape, generator=generator, dtype=torch.bfloat16)
        values.mul_(config.hidden_size ** -0.5)
    elif name.endswith("norm.weight"):
        values = _normal(shape, 0.05, generator, mean=1.0)
    elif leaf == "attn_sink":
        values = _normal(shape, 1.0, generator)
    elif leaf == "ape":
        values = _normal(shape, 0.5, generator)
    elif leaf.startswith("hc_") and leaf.endswith("_fn"):
        values = _normal(shape, 0.05 / math.sqrt(shape[-1]), generator)
    elif leaf.startswith("hc_") and leaf.endswith("_base"):
        values = _normal(shape, 0.5, generator)
    elif leaf.startswith("hc_") and leaf.endswith("_scale"):
        values = torch.rand(shape, generator=generator).mul_(0.5).add_(0.5)
    elif name.endswith("gate.bias"):
        values = _normal(shape, 0.1, generator)
    elif leaf == "tid2eid":
        values = _random_tid2eid(shape, config.n_routed_experts, generator)
    elif leaf == "weight" and len(shape) == 2:
        return _random_linear(name, spec, scale_spec, stream, generator)
    else:
        raise ValueError(f"no random initialization rule for tensor {name!r} {spec}")
    return {name: values.to(spec.dtype)}


def _random_linear(name: str, spec: TensorSpec, scale_spec: TensorSpec | None, stream: int,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    std = _fan_in(name, spec) ** -0.5
    scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
    if spec.dtype == torch.int8:
        packed, scale = sample_fp4(spec.shape, std, stream)  # [out, in/2], [out, in/32]
        return {name: packed, scale_name: scale}
    values = _normal(spec.shape, std, generator)
    if spec.dtype == torch.float8_e4m3fn:
        quantized, scale = quantize_fp8_blocks(values)
        return {name: quantized, scale_name: scale}
    if scale_spec is not None:
        raise ValueError(f"{name}: a {spec.dtype} weight takes no scale")
    return {name: values.to(spec.dtype)}


def _random_tid2eid(shape: tuple[int, ...], num_experts: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Return ``[vocab, k]`` int64 rows of k distinct experts drawn uniformly from ``num_experts``."""
    vocab, per_token = shape
    keys = torch.rand(vocab, num_experts, generator=generator)
    return keys.topk(per_token, dim=1).indices.to(torch.int64)

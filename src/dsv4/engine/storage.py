"""Entry stores of the engine: preallocated rows of compressed KV entries and index keys.

The model calls ``append(rows)``, ``view(dtype)``, ``length``, ``truncate(n)`` and ``nbytes()``.
Both stores here allocate their whole capacity up front (the rows a request reserved), so the
bytes they hold match the cache manager's arithmetic and never grow during decoding.

* ``FloatStore``: rows kept in one float dtype.
* ``DeploymentKVStore``: the non-rope dims as FP8 e4m3 with one UE8M0 scale per 64, the rope
  dims in ``rope_dtype``.
* ``DeploymentKeyStore``: index keys as FP4 e2m1, two per byte, one UE8M0 scale per 32.

In reference numerics the model rounds KV entries and index keys exactly like these formats
store them, so the deployment stores return the same values the float stores would.
"""

from __future__ import annotations

import torch

from dsv4.model import quant

from .cache_manager import FP4_BLOCK, FP8_BLOCK


class _Rows:
    """Capacity and length bookkeeping shared by the stores."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0

    def _claim(self, n: int) -> slice:
        if self.length + n > self.capacity:
            raise RuntimeError(
                f"entry store is full: {self.length} + {n} rows exceed the {self.capacity} rows "
                f"reserved for this sequence; the request outgrew its reserved context")
        rows = slice(self.length, self.length + n)
        self.length += n
        return rows

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate an entry store of {self.length} rows to {length}")
        self.length = length


class FloatStore(_Rows):
    def __init__(self, width: int, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__(capacity)
        self.width = width
        self.data = torch.zeros(capacity, width, dtype=dtype, device=device)  # [capacity, width]

    def append(self, rows: torch.Tensor) -> None:
        self.data[self._claim(rows.shape[0])] = rows.to(self.data.dtype)

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        return self.data[: self.length].to(dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class DeploymentKVStore(_Rows):
    """KV entries [n, head_dim]: FP8 non-rope dims + UE8M0 scales + rope dims in ``rope_dtype``."""

    def __init__(self, head_dim: int, rope_dim: int, capacity: int, rope_dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__(capacity)
        nope = head_dim - rope_dim
        if nope % FP8_BLOCK:
            raise ValueError(f"the FP8 KV store needs head_dim - rope_dim to be a multiple of "
                             f"{FP8_BLOCK}, got {nope}; use the float store for this config")
        self.width = head_dim
        self.nope = nope
        self.values = torch.zeros(capacity, nope, dtype=torch.float8_e4m3fn, device=device)
        self.scales = torch.zeros(capacity, nope // FP8_BLOCK, dtype=torch.uint8, device=device)  # UE8M0
        self.rope = torch.zeros(capacity, rope_dim, dtype=rope_dtype, device=device)

    def append(self, rows: torch.Tensor) -> None:
        target = self._claim(rows.shape[0])
        if rows.shape[0] == 0:
            return
        quantized, scale = quant.fp8_quantize_activation(rows[:, : self.nope], FP8_BLOCK)
        self.values[target] = quantized.to(torch.float8_e4m3fn)  # exact: already e4m3 values
        self.scales[target] = quant.float_to_ue8m0(quant.ceil_log2(scale)).view(torch.uint8)
        self.rope[target] = rows[:, self.nope:].to(self.rope.dtype)

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.length
        scale = quant.ue8m0_to_float(self.scales[:n])  # [n, nope / 64]
        blocks = self.values[:n].float().view(n, self.nope // FP8_BLOCK, FP8_BLOCK) * scale.unsqueeze(-1)
        return torch.cat((blocks.view(n, self.nope), self.rope[:n].float()), dim=-1).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scales, self.rope))


class DeploymentKeyStore(_Rows):
    """Index keys [n, width] as packed FP4 e2m1 with one UE8M0 scale per 32 values."""

    def __init__(self, width: int, capacity: int, device: torch.device | str = "cpu"):
        super().__init__(capacity)
        if width % FP4_BLOCK:
            raise ValueError(f"the FP4 key store needs index_head_dim to be a multiple of "
                             f"{FP4_BLOCK}, got {width}; use the float store for this config")
        self.width = width
        self.packed = torch.zeros(capacity, width // 2, dtype=torch.int8, device=device)
        self.scales = torch.zeros(capacity, width // FP4_BLOCK, dtype=torch.uint8, device=device)  # UE8M0

    def append(self, rows: torch.Tensor) -> None:
        target = self._claim(rows.shape[0])
        if rows.shape[0] == 0:
            return
        packed, scale = quant.quantize_fp4(rows.float(), block=FP4_BLOCK)
        self.packed[target] = packed
        self.scales[target] = scale.view(torch.uint8)

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.length
        return quant.dequantize_fp4(self.packed[:n], self.scales[:n].view(torch.float8_e8m0fnu),
                                    dtype=torch.float32).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales))


def make_store_factory(kind: str, config, capacity_for_width, dtype: torch.dtype, device="cpu"):
    """A ``store_factory(width)`` for ``LayerState``.

    ``kind`` is "float" or "deployment"; ``capacity_for_width(width)`` returns the rows to
    preallocate for a store of that width (KV entries have head_dim, index keys index_head_dim).
    """
    if kind not in ("float", "deployment"):
        raise ValueError(f"unknown cache storage {kind!r}; expected 'float' or 'deployment'")

    def factory(width: int):
        capacity = capacity_for_width(width)
        if kind == "float":
            return FloatStore(width, capacity, dtype, device)
        if width == config.head_dim:
            return DeploymentKVStore(width, config.qk_rope_head_dim, capacity, dtype, device)
        return DeploymentKeyStore(width, capacity, device)

    return factory

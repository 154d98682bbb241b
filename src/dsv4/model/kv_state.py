"""Per-sequence attention state of one layer: window ring, compressor buffers, compressed entries.

The model reads and writes this state for every chunk it processes, so a full forward (one
chunk from position 0 with a fresh state), chunked prefill and one-token decoding all run the
same code. The engine allocates these objects for its sequences; ``EntryStore`` is the storage
interface it may replace (for example with FP8 storage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class EntryStore:
    """An append-only list of fixed-width vectors, preallocated and grown by doubling.

    Compressed KV entries [C, head_dim] and index keys [C, index_head_dim] live here.
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str, capacity: int = 0):
        self.width = width
        self.data = torch.zeros(capacity, width, dtype=dtype, device=device)  # [capacity, width]
        self.length = 0

    def append(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if self.length + n > self.data.shape[0]:
            grown = torch.zeros(max(2 * self.data.shape[0], self.length + n, 16), self.width,
                                dtype=self.data.dtype, device=self.data.device)
            grown[: self.length] = self.data[: self.length]
            self.data = grown
        self.data[self.length: self.length + n] = rows
        self.length += n

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored rows [length, width] in ``dtype``."""
        return self.data[: self.length].to(dtype)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate an entry store of {self.length} rows to {length}")
        self.length = length

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class CompressorBuffer:
    """Projections of the tokens a compressor has not pooled yet (float32).

    ``kv``/``score`` [ratio, width]: rows of the open block, slot = position % ratio, of which
    the first ``position % ratio`` are filled. ``prev_kv``/``prev_score`` (overlapping CSA only):
    the last complete block's rows, whose first halves feed the next entry; scores start at
    -inf so that block 0 has no previous block.
    """

    kv: torch.Tensor
    score: torch.Tensor
    prev_kv: torch.Tensor | None
    prev_score: torch.Tensor | None

    @classmethod
    def empty(cls, ratio: int, width: int, overlap: bool, device) -> "CompressorBuffer":
        def rows(fill: float) -> torch.Tensor:
            return torch.full((ratio, width), fill, dtype=torch.float32, device=device)

        if overlap:
            return cls(rows(0.0), rows(float("-inf")), rows(0.0), rows(float("-inf")))
        return cls(rows(0.0), rows(float("-inf")), None, None)

    def clone(self) -> "CompressorBuffer":
        def copy(t):
            return None if t is None else t.clone()

        return CompressorBuffer(copy(self.kv), copy(self.score), copy(self.prev_kv), copy(self.prev_score))

    def nbytes(self) -> int:
        tensors = (self.kv, self.score, self.prev_kv, self.prev_score)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LayerState:
    """Everything one attention layer keeps for one sequence between chunks."""

    def __init__(self, ratio: int, window: int, head_dim: int, index_head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 store_factory=None):
        make_store = store_factory or (lambda width: EntryStore(width, dtype, device))
        self.ratio = ratio
        self.length = 0  # tokens of the sequence processed so far
        self.window = torch.zeros(window, head_dim, dtype=dtype, device=device)  # slot = position % window
        self.compressor: CompressorBuffer | None = None
        self.index_compressor: CompressorBuffer | None = None
        self.compressed: EntryStore | None = None
        self.index_keys: EntryStore | None = None
        if ratio:
            overlap = ratio == 4
            width = (2 if overlap else 1) * head_dim
            self.compressor = CompressorBuffer.empty(ratio, width, overlap, device)
            self.compressed = make_store(head_dim)
        if ratio == 4:
            self.index_compressor = CompressorBuffer.empty(ratio, 2 * index_head_dim, True, device)
            self.index_keys = make_store(index_head_dim)

    def window_rows(self, start: int, end: int) -> torch.Tensor:
        """Window entries of positions [start, end) (all still in the ring), in order."""
        size = self.window.shape[0]
        if end - start > size or start < self.length - size or end > self.length:
            raise ValueError(f"positions [{start}, {end}) are not in the window ring "
                             f"(length {self.length}, window {size})")
        slots = torch.arange(start, end, device=self.window.device) % size
        return self.window[slots]

    def push_window(self, kv: torch.Tensor, start: int) -> None:
        """Write kv [n, head_dim] of positions [start, start + n) into the ring."""
        size = self.window.shape[0]
        n = kv.shape[0]
        keep = min(n, size)
        positions = torch.arange(start + n - keep, start + n, device=self.window.device)
        self.window[positions % size] = kv[n - keep:].to(self.window.dtype)


class SequenceState:
    """Attention state of every layer (the MTP block included) for one sequence."""

    def __init__(self, layers: list[LayerState], mtp: list[LayerState]):
        self.layers = layers
        self.mtp = mtp

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

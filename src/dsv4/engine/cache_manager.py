"""KV cache arithmetic and block accounting for the engine (plain Python, no torch).

Every attention layer keeps, per sequence:

* a ring of the last ``sliding_window`` KV vectors (fixed size);
* on compressed layers (ratio m > 0) the compressor's pending rows in float32: kv projections and
  gate logits of the open block, plus the previous block for overlapping CSA (m = 4), for the
  main compressor and, on CSA, the indexer's compressor (fixed size);
* one compressed KV entry per complete block of m tokens and, on CSA, one index key per entry
  (grows with the context).

Entries live in blocks of ``block_entries`` rows that are reserved when a request is admitted
and released when it finishes, so the bytes held always equal ``sequence_bytes`` of the
reserved context.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from dsv4.config import ModelConfig

logger = logging.getLogger(__name__)

FLOAT32_BYTES = 4
UE8M0_BYTES = 1
FP8_BLOCK = 64  # non-rope KV dims per UE8M0 scale in the deployment cache
FP4_BLOCK = 32  # index-key dims per UE8M0 scale


@dataclass(frozen=True)
class StorageFormat:
    """Bytes of one stored vector of each kind.

    ``kv_entry``: one compressed KV entry; ``index_key``: one indexer key; ``window_entry``:
    one ring slot of the sliding window.
    """

    name: str
    kv_entry: int
    index_key: int
    window_entry: int


def float_format(config: ModelConfig, element_bytes: int, window_element_bytes: int | None = None,
                 name: str = "float") -> StorageFormat:
    """Return the format that stores every vector unquantized, ``element_bytes`` per value."""
    window_bytes = window_element_bytes or element_bytes
    return StorageFormat(name, config.head_dim * element_bytes, config.index_head_dim * element_bytes,
                         config.head_dim * window_bytes)


def deployment_entry_bytes(config: ModelConfig, rope_element_bytes: int = 2) -> tuple[int, int]:
    """Bytes of one KV entry and one index key in the deployment format.

    KV entry: FP8 e4m3 non-rope dims, one UE8M0 scale per 64 of them, rope dims in
    ``rope_element_bytes`` (2 = bf16; the engine keeps them in the activation dtype so that
    reference numerics stay lossless). Index key: FP4 e2m1 (two per byte) and one UE8M0 scale
    per 32 values. For the released head_dim 512 / rope 64 / index 128: 583 B and 68 B.
    """
    nope = config.nope_head_dim
    kv = nope + math.ceil(nope / FP8_BLOCK) * UE8M0_BYTES + config.qk_rope_head_dim * rope_element_bytes
    key = math.ceil(config.index_head_dim / 2) + math.ceil(config.index_head_dim / FP4_BLOCK) * UE8M0_BYTES
    return kv, key


def deployment_format(config: ModelConfig, rope_element_bytes: int = 2,
                      window_entry_bytes: int | None = None) -> StorageFormat:
    """Return the deployment format. The window ring is stored like a KV entry unless
    ``window_entry_bytes`` is given."""
    kv, key = deployment_entry_bytes(config, rope_element_bytes)
    return StorageFormat("deployment", kv, key, window_entry_bytes if window_entry_bytes is not None else kv)


@dataclass(frozen=True)
class LayerCost:
    """Fixed bytes per sequence and stored vectors of one attention layer."""

    kind: str  # "sliding", "csa", "hca" or "mtp"
    ratio: int
    fixed_bytes: int  # window ring + compressor pending rows
    entry_bytes: int  # one compressed entry (KV entry + index key on CSA)


def pending_bytes(config: ModelConfig, ratio: int) -> int:
    """Float32 pending rows of the compressors of a layer with compress ratio ``ratio``.

    Each buffer keeps kv and gate rows of the open block; overlapping CSA also keeps the
    previous block and projects two halves per token.
    """
    if ratio == 0:
        return 0
    if ratio == 4:
        main = 4 * 4 * 2 * config.head_dim  # (kv, score, prev_kv, prev_score) x 4 rows x 2D
        index = 4 * 4 * 2 * config.index_head_dim
        return (main + index) * FLOAT32_BYTES
    return 2 * ratio * config.head_dim * FLOAT32_BYTES  # (kv, score) x m rows x D


def layer_costs(config: ModelConfig, fmt: StorageFormat, include_mtp: bool = True) -> list[LayerCost]:
    """Cost of every layer of the model, the MTP blocks last."""
    costs = []
    window = config.sliding_window * fmt.window_entry
    for ratio in config.layer_ratios:
        kind = config.layer_kind(ratio)
        entry = 0
        if ratio:
            entry = fmt.kv_entry + (fmt.index_key if ratio == 4 else 0)
        costs.append(LayerCost(kind, ratio, window + pending_bytes(config, ratio), entry))
    if include_mtp:
        for ratio in config.mtp_ratios:
            entry = 0
            if ratio:
                entry = fmt.kv_entry + (fmt.index_key if ratio == 4 else 0)
            costs.append(LayerCost("mtp", ratio, window + pending_bytes(config, ratio), entry))
    return costs


def entries_at(context: int, ratio: int) -> int:
    """Compressed entries of a layer after ``context`` tokens (complete blocks only)."""
    return context // ratio if ratio else 0


def reserved_entries(context: int, ratio: int, block_entries: int) -> int:
    """Entry rows reserved for a context: whole blocks of ``block_entries`` rows."""
    entries = entries_at(context, ratio)
    return math.ceil(entries / block_entries) * block_entries


def sequence_bytes(config: ModelConfig, fmt: StorageFormat, context: int, block_entries: int = 1,
                   include_mtp: bool = True) -> dict[str, int]:
    """Return the bytes one sequence allocates at ``context`` tokens, per layer kind.

    With ``block_entries`` > 1 the entries are counted in whole reserved blocks, which is what
    the engine allocates.
    """
    totals: dict[str, int] = {}
    for cost in layer_costs(config, fmt, include_mtp):
        rows = reserved_entries(context, cost.ratio, block_entries)
        totals[cost.kind] = totals.get(cost.kind, 0) + cost.fixed_bytes + rows * cost.entry_bytes
    return totals


class CacheFullError(RuntimeError):
    """Error raised when a request needs more cache bytes than the budget allows."""


@dataclass
class Reservation:
    request_id: str
    context: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_kind.values())


class CacheManager:
    """Admission and accounting of per-sequence cache memory under a byte budget.

    A request reserves the bytes of its maximum context (prompt + max new tokens) when it is
    admitted, so a running sequence never runs out of cache. ``release`` frees them.
    """

    def __init__(self, config: ModelConfig, fmt: StorageFormat, budget_bytes: int | None = None,
                 block_entries: int = 64, include_mtp: bool = True):
        if block_entries <= 0:
            raise ValueError(f"block_entries must be positive, got {block_entries}")
        self.config = config
        self.format = fmt
        self.budget_bytes = budget_bytes
        self.block_entries = block_entries
        self.include_mtp = include_mtp
        self._reservations: dict[str, Reservation] = {}

    def bytes_for(self, context: int) -> dict[str, int]:
        return sequence_bytes(self.config, self.format, context, self.block_entries, self.include_mtp)

    def check_fits(self, request_id: str, context: int) -> None:
        """Raise CacheFullError when ``context`` can never fit, even in an empty cache."""
        need = sum(self.bytes_for(context).values())
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise CacheFullError(
                f"request {request_id!r} needs {need} cache bytes for {context} tokens but the "
                f"cache budget is {self.budget_bytes} bytes; lower max_tokens or raise the budget")

    def can_reserve(self, context: int) -> bool:
        if self.budget_bytes is None:
            return True
        need = sum(self.bytes_for(context).values())
        return self.bytes_in_use() + need <= self.budget_bytes

    def reserve(self, request_id: str, context: int) -> Reservation:
        if request_id in self._reservations:
            raise ValueError(f"request {request_id!r} already has a cache reservation")
        if not self.can_reserve(context):
            raise CacheFullError(f"no cache room for request {request_id!r} ({context} tokens)")
        reservation = Reservation(request_id, context, self.bytes_for(context))
        self._reservations[request_id] = reservation
        logger.debug("reserved %d cache bytes for %s (%d tokens)", reservation.total, request_id, context)
        return reservation

    def release(self, request_id: str) -> None:
        reservation = self._reservations.pop(request_id, None)
        if reservation is not None:
            logger.debug("released %d cache bytes of %s", reservation.total, request_id)

    def reservation(self, request_id: str) -> Reservation | None:
        return self._reservations.get(request_id)

    def bytes_in_use(self) -> int:
        return sum(r.total for r in self._reservations.values())

    def bytes_in_use_by_kind(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for reservation in self._reservations.values():
            for kind, value in reservation.bytes_by_kind.items():
                totals[kind] = totals.get(kind, 0) + value
        return totals

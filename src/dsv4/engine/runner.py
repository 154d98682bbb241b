"""The model runner: the one place where engine requests become tensors.

It allocates per-sequence attention state with preallocated entry stores, packs the chunks of
one step into a flattened batch (no padding), calls the model and returns the logits rows and
streams each chunk needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dsv4.model.kv_state import LayerState, SequenceState
from dsv4.model.safetensors_io import release_pages
from dsv4.model.transformer import Chunk, Transformer

from .cache_manager import reserved_entries
from .storage import make_store_factory

logger = logging.getLogger(__name__)


@dataclass
class RunItem:
    """Run ``token_ids`` at positions [start, start + n) of ``state``; return logits of the rows
    from ``logits_from`` on (n = none) and, with ``keep_streams``, every row's final streams."""

    state: SequenceState
    token_ids: list[int]
    start: int
    logits_from: int
    keep_streams: bool = False


@dataclass
class RunResult:
    logits: torch.Tensor  # [rows, V] float32, rows = n - logits_from
    streams: torch.Tensor | None  # [n, hc, d] when requested


class ModelRunner:
    def __init__(self, model: Transformer, storage: str = "float", block_entries: int = 64):
        self.model = model
        self.config = model.config
        self.storage = storage
        self.block_entries = block_entries
        self.device = model.embed.weight.device
        make_store_factory(storage, self.config, lambda width: 0, model.dtype)  # validates ``storage``

    def upcast_weights(self) -> int:
        """Store every bf16 parameter in the activation dtype once, instead of per matmul.

        The model casts bf16 weights (head, norms, compressors, bf16 linears) to the activation
        dtype inside every call, which dominates decode time on the CPU. The cast is exact. The
        LM head is also stored transposed ([d, V] in memory, still a [V, d] parameter), which
        more than halves the time of a one-row head matmul; the sums then run in another order,
        so logits change within float32 rounding. The embedding stays bf16: a lookup converts
        only the rows it reads. The file pages of replaced weights are released. Returns the
        bytes added.
        """
        added = 0
        target = self.model.dtype
        if target == torch.bfloat16:
            return 0
        embedding = self.model.embed.weight
        for module in self.model.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is None or parameter.dtype != torch.bfloat16 or parameter is embedding:
                    continue
                if module is self.model.head:
                    upcast = _transposed_copy(parameter.data, target)
                else:
                    upcast = parameter.data.to(target)
                module._parameters[name] = nn.Parameter(upcast, requires_grad=False)
                added += parameter.numel() * (target.itemsize - parameter.element_size())
                release_pages(parameter.data)
        logger.info("upcast bf16 weights to %s (+%.1f MiB)", target, added / 2**20)
        return added

    # ------------------------------------------------------------------ state

    def new_state(self, max_context: int) -> SequenceState:
        """Allocate a state whose entry stores hold the blocks of ``max_context`` tokens."""
        c = self.config
        model = self.model

        def layer_state(ratio: int) -> LayerState:
            rows = reserved_entries(max_context, ratio, self.block_entries)
            factory = make_store_factory(self.storage, c, lambda width: rows, model.dtype, self.device)
            return LayerState(ratio, c.sliding_window, c.head_dim, c.index_head_dim, model.dtype,
                              self.device, factory)

        return SequenceState([layer_state(r) for r in c.layer_ratios], [layer_state(r) for r in c.mtp_ratios])

    def held_bytes(self, state: SequenceState) -> dict[str, int]:
        """Bytes of every tensor the state holds, per layer kind ("sliding", "csa", "hca", "mtp")."""
        totals: dict[str, int] = {}
        tagged = [(self.config.layer_kind(layer.ratio), layer) for layer in state.layers]
        tagged += [("mtp", layer) for layer in state.mtp]
        for kind, layer in tagged:
            held = layer.window.numel() * layer.window.element_size()
            for buffer in (layer.compressor, layer.index_compressor):
                if buffer is not None:
                    held += buffer.nbytes()
            for store in (layer.compressed, layer.index_keys):
                if store is not None:
                    held += store.nbytes()
            totals[kind] = totals.get(kind, 0) + held
        return totals

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def run(self, items: list[RunItem]) -> list[RunResult]:
        """Run every item's tokens in one model call, flattened in order."""
        if not items:
            return []
        token_ids = torch.tensor([t for item in items for t in item.token_ids], dtype=torch.long,
                                 device=self.device)  # [T]
        chunks = []
        offset = 0
        for item in items:
            chunks.append(Chunk(offset, len(item.token_ids), item.start, item.state))
            offset += len(item.token_ids)
        streams = self.model.forward_streams(token_ids, chunks)  # [T, hc, d]

        # Compute logits only for the rows the engine samples from.
        rows = [torch.arange(c.offset + item.logits_from, c.offset + c.length)
                for c, item in zip(chunks, items)]
        flat_rows = torch.cat(rows).to(self.device)
        if flat_rows.numel():
            logits = self.model.logits_from_streams(streams[flat_rows])  # [R, V]
        else:
            logits = streams.new_zeros(0, self.config.vocab_size, dtype=torch.float32)
        results = []
        cursor = 0
        for chunk, item, picked in zip(chunks, items, rows):
            own = logits[cursor: cursor + picked.numel()]
            cursor += picked.numel()
            kept = streams[chunk.offset: chunk.offset + chunk.length] if item.keep_streams else None
            results.append(RunResult(own, kept))
        return results

    @torch.inference_mode()
    def run_mtp(self, states: list[SequenceState], streams: list[torch.Tensor], next_ids: list[list[int]],
                starts: list[int]) -> list[torch.Tensor]:
        """MTP block 0 over each sequence's positions [start, start + n): main streams [n, hc, d]
        and the tokens at the next positions -> logits of each chunk's last row, [V] each."""
        chunks = []
        offset = 0
        for state, rows, start in zip(states, streams, starts):
            chunks.append(Chunk(offset, rows.shape[0], start, state))
            offset += rows.shape[0]
        flat_streams = torch.cat(streams)  # [T, hc, d]
        flat_ids = torch.tensor([t for ids in next_ids for t in ids], dtype=torch.long, device=self.device)
        logits = self.model.mtp_logits(flat_streams, flat_ids, chunks, depth=0)  # [T, V]
        return [logits[c.offset + c.length - 1] for c in chunks]


def _transposed_copy(weight: torch.Tensor, dtype: torch.dtype, block_rows: int = 8192) -> torch.Tensor:
    """Copy a [rows, cols] weight into new [cols, rows] memory in ``dtype``; return a [rows, cols] view.

    Converted one block of rows at a time, releasing each block's file pages, so the process
    never holds a second full copy of the source.
    """
    rows, cols = weight.shape
    out = torch.empty(cols, rows, dtype=dtype, device=weight.device)  # [cols, rows]
    for start in range(0, rows, block_rows):
        block = weight[start: start + block_rows]  # [block, cols]
        out[:, start: start + block.shape[0]] = block.t()
        release_pages(block)
    return out.t()

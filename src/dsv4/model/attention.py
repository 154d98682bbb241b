"""DeepSeek-V4 attention: one shared K=V head over [sliding window ; compressed entries].

Shapes (per chunk of one sequence): n tokens, H query heads, D head_dim, R rope dims, W window.
Queries come from a low-rank projection with a weightless RMS norm per head; the single KV
vector of a token is both key and value for every head. A query at position t attends to the
window positions max(0, t-W+1)..t plus, on layers with a compressor, the compressed entries
visible at t (all of them on HCA layers, the indexer's top-k on CSA layers). A learned per-head
sink logit enlarges the softmax denominator only. Because values carry rotated dims, the output's
rope dims are rotated back by the query position before the grouped output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model import quant
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.kv_state import LayerState
from dsv4.model.linear import Numerics, QuantLinear
from dsv4.model.norm import RMSNorm, rms_norm
from dsv4.model.rope import RopeTable, apply_rope, rope_cos_sin

# Elements of the gathered keys and scores of the query rows processed at once.
_GATHER_BUDGET = 1 << 22


@dataclass
class Segment:
    """One sequence's chunk inside a flattened batch: tokens [offset, offset + length) of the
    batch are positions [start, start + length) of the sequence whose layer state is ``state``."""

    offset: int
    length: int
    start: int
    state: LayerState


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, numerics: Numerics):
        super().__init__()
        self.config = config
        self.ratio = ratio
        self.numerics = numerics
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        fmt = "fp8" if config.weight_dtype == "fp8" else "bf16"
        dim = config.hidden_size
        self.rope = RopeTable(config, ratio)

        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads), requires_grad=False)
        self.wq_a = QuantLinear(dim, config.q_lora_rank, fmt, numerics)
        self.q_norm = RMSNorm(config.q_lora_rank, self.eps)
        self.wq_b = QuantLinear(config.q_lora_rank, self.n_heads * self.head_dim, fmt, numerics)
        self.wkv = QuantLinear(dim, self.head_dim, fmt, numerics)
        self.kv_norm = RMSNorm(self.head_dim, self.eps)
        group_width = config.heads_per_group * self.head_dim
        self.wo_a = QuantLinear(group_width, config.o_groups * config.o_lora_rank, fmt, numerics)
        self.wo_b = QuantLinear(config.o_groups * config.o_lora_rank, dim, fmt, numerics)
        self.compressor = None
        self.indexer = None
        if ratio:
            self.compressor = Compressor(dim, self.head_dim, self.rope_dim, ratio, self.eps, self.rope, numerics)
        if ratio == 4:
            self.indexer = Indexer(dim, config.q_lora_rank, config.index_n_heads, config.index_head_dim,
                                   self.rope_dim, config.index_topk, self.eps, self.rope, numerics, fmt)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """x: [T, dim] normalised block input of a flattened batch; positions: [T] long."""
        cos, sin = rope_cos_sin(self.rope.frequencies(x.device), positions, torch.float32)  # [T, R/2] each

        # q: low rank, per-head RMS without weight, rotate the last R dims.
        qr = self.q_norm(self.wq_a(x))  # [T, q_lora_rank]
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [T, H, D]
        q = rms_norm(q, None, self.eps)
        q = apply_rope(q, cos, sin)

        # kv: one head, rotated, non-rope dims rounded as the FP8 deployment cache stores them.
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [T, D]
        if self.numerics.reference:
            kv = quant.fp8_round_nope(kv, self.head_dim - self.rope_dim)

        out = torch.empty_like(q)  # [T, H, D]
        for seg in segments:
            rows = slice(seg.offset, seg.offset + seg.length)
            out[rows] = self._attend_segment(x[rows], qr[rows], q[rows], kv[rows],
                                             cos[rows], sin[rows], seg.start, seg.state)

        # De-rotate the output's rope dims by the query position, then project per head group.
        out = apply_rope(out, cos, sin, inverse=True)
        groups = self.config.o_groups
        out = out.reshape(out.shape[0], groups, -1)  # [T, G, H/G * D]
        # wo_a is applied as a plain grouped matmul on its dequantized weight, as DeepSeek does.
        wo_a = self.wo_a.dequantized_weight(out.dtype).view(groups, self.config.o_lora_rank, -1)
        low = torch.einsum("tgi,gri->tgr", out, wo_a)  # [T, G, o_lora_rank]
        return self.wo_b(low.flatten(1))

    def _attend_segment(self, x, qr, q, kv, cos, sin, start: int, state: LayerState) -> torch.Tensor:
        """Attention output [n, H, D] for tokens [start, start + n) of one sequence."""
        n = q.shape[0]
        if state.length != start:
            raise ValueError(f"layer state contains {state.length} tokens but the chunk starts at "
                             f"position {start}; chunks of a sequence must be contiguous")
        # Keys of the window: ring entries still needed by the first query, then the chunk.
        first = max(0, start - self.window + 1)
        window_keys = torch.cat((state.window_rows(first, start).to(kv.dtype), kv))  # [start-first+n, D]
        state.push_window(kv, start)

        # Query t attends to window keys [begin, end): positions max(0, t - W + 1)..t.
        query_pos = torch.arange(start, start + n, device=q.device)
        window_begin = (query_pos - self.window + 1).clamp(min=0) - first  # [n]
        ranges = [(window_keys, window_begin, query_pos - first + 1)]
        gathered = []
        if self.compressor is not None:
            state.compressed.append(self.compressor(x, start, state.compressor))
            compressed = state.compressed.view(kv.dtype)  # [C, D]
            if self.indexer is not None:
                chosen = self.indexer(x, qr, cos, sin, start, state)  # [n, k], -1 = none
                gathered.append((compressed, chosen))
            else:
                # HCA: every query attends to the entries of the blocks complete at its position.
                ranges.append((compressed, torch.zeros_like(query_pos), (query_pos + 1) // self.ratio))
        state.length = start + n
        return sparse_attention(q, self.attn_sink, self.head_dim ** -0.5, ranges, gathered)


def sparse_attention(q: torch.Tensor, sink: torch.Tensor, softmax_scale: float,
                     ranges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
                     gathered: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
    """Softmax attention of each query over its own key subset, with a sink logit per head.

    q: [n, H, D]. Keys are also the values, and a query's keys come from two kinds of source:
    ``ranges``, (keys [N, D], begin [n], end [n]): query t attends to rows [begin[t], end[t]), scored
    by one matmul per block of queries; ``gathered``, (keys [N, D], index [n, L]): query t attends to
    the rows its index row names (-1 for none). sink: [H]; it adds exp(sink - max) to the
    denominator and nothing to the numerator. Returns [n, H, D] in q's dtype, computed in
    float32.
    """
    n, heads, dim = q.shape
    out = torch.empty_like(q)
    if n == 0:
        return out
    # A block's range of keys spans at most the widest query's range plus the block's rows.
    range_widths = [int((end - begin).max()) for _, begin, end in ranges]  # widest query per range
    gathered_width = sum(index.shape[1] for _, index in gathered)
    per_row = heads * 2 * (sum(range_widths) + gathered_width) + gathered_width * dim
    rows_per_block = max(1, _GATHER_BUDGET // max(1, per_row))
    if range_widths:  # a block much taller than the narrowest range would mostly score hidden keys
        rows_per_block = min(rows_per_block, max(32, min(range_widths)))
    sink = sink.float().view(1, heads)
    for lo in range(0, n, rows_per_block):
        hi = min(n, lo + rows_per_block)
        query = q[lo:hi].float()  # [b, H, D]
        values, scores = [], []
        for keys, begin, end in ranges:
            first, last = int(begin[lo:hi].min()), int(end[lo:hi].max())
            block = keys[first:last].float()  # [m, D]
            columns = torch.arange(first, max(first, last), device=q.device)
            hidden = (columns < begin[lo:hi, None]) | (columns >= end[lo:hi, None])  # [b, m]
            part = torch.einsum("bhd,md->bhm", query, block).mul_(softmax_scale)
            scores.append(part.masked_fill_(hidden.unsqueeze(1), float("-inf")))
            values.append(block)
        for keys, index in gathered:
            rows = index[lo:hi]
            block = keys[rows.clamp(min=0)].float()  # [b, L, D]
            part = torch.einsum("bhd,bld->bhl", query, block).mul_(softmax_scale)
            scores.append(part.masked_fill_((rows < 0).unsqueeze(1), float("-inf")))
            values.append(block)
        logits = torch.cat(scores, -1)  # [b, H, sum of widths]
        if logits.shape[-1] == 0:  # no key in any source: only the sink, so the output is 0
            out[lo:hi] = 0
            continue
        peak = torch.maximum(logits.amax(-1), sink)  # [b, H]
        probs = torch.exp(logits - peak.unsqueeze(-1))
        denominator = probs.sum(-1) + torch.exp(sink - peak)
        weights = probs / denominator.unsqueeze(-1)
        mixed = torch.zeros_like(query)  # [b, H, D]
        offset = 0
        for part, block in zip(scores, values):
            share = weights[..., offset: offset + part.shape[-1]]
            offset += part.shape[-1]
            pattern = "bhm,md->bhd" if block.dim() == 2 else "bhl,bld->bhd"
            mixed += torch.einsum(pattern, share, block)
        out[lo:hi] = mixed.to(q.dtype)
    return out

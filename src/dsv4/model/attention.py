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

        query_pos = torch.arange(start, start + n, device=q.device)
        lo = (query_pos - self.window + 1).clamp(min=0) - first  # [n] first window key per query
        span = torch.arange(min(self.window, start - first + n), device=q.device)
        window_idx = lo.unsqueeze(1) + span  # [n, W'] into window_keys
        window_idx = torch.where(window_idx <= (query_pos - first).unsqueeze(1), window_idx, -1)

        sources = [(window_keys, window_idx)]
        dense = None
        if self.compressor is not None:
            state.compressed.append(self.compressor(x, start, state.compressor))
            compressed = state.compressed.view(kv.dtype)  # [C, D]
            if self.indexer is not None:
                chosen = self.indexer(x, qr, cos, sin, start, state)  # [n, k], -1 = none
                sources.append((compressed, chosen))
            else:
                # HCA: every query attends to all entries visible to it, a prefix of the same list.
                dense = (compressed, (query_pos + 1) // self.ratio)
        state.length = start + n
        return sparse_attention(q, sources, self.attn_sink, self.head_dim ** -0.5, dense)


def sparse_attention(q: torch.Tensor, sources: list[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor,
                     softmax_scale: float, dense: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Softmax attention of each query over its own key subset, with a sink logit per head.

    q: [n, H, D]; sources: (keys [N, D], index [n, L]) pairs, each query attending to the rows
    of ``keys`` its index row names (-1 for none); keys are also the values. ``dense``:
    (keys [C, D], visible [n]), each query attending to the first visible[t] rows, computed as
    a matmul instead of a gather. sink: [H]; it adds exp(sink - max) to the denominator and
    nothing to the numerator. Returns [n, H, D] in q's dtype; scores and sums in float32.
    """
    n, heads, dim = q.shape
    out = torch.empty_like(q)
    if n == 0:
        return out
    width = sum(index.shape[1] for _, index in sources)
    dense_keys = dense[0].float() if dense is not None else q.new_zeros(0, dim, dtype=torch.float32)
    per_row = width * dim + heads * (width + dense_keys.shape[0])  # gathered keys + scores
    rows_per_block = max(1, _GATHER_BUDGET // max(1, per_row))
    sink = sink.float().view(1, heads)
    dense_columns = torch.arange(dense_keys.shape[0], device=q.device)
    for lo in range(0, n, rows_per_block):
        hi = min(n, lo + rows_per_block)
        query = q[lo:hi].float()  # [b, H, D]
        gathered = torch.cat([keys[index[lo:hi].clamp(min=0)].float() for keys, index in sources], 1)  # [b, L, D]
        valid = torch.cat([index[lo:hi] >= 0 for _, index in sources], 1)  # [b, L]
        scores = torch.einsum("bhd,bld->bhl", query, gathered) * softmax_scale
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        if dense is not None:
            hidden = dense_columns.unsqueeze(0) >= dense[1][lo:hi].unsqueeze(1)  # [b, C]
            dense_scores = torch.einsum("bhd,cd->bhc", query, dense_keys) * softmax_scale
            scores = torch.cat((scores, dense_scores.masked_fill_(hidden.unsqueeze(1), float("-inf"))), -1)
        peak = torch.maximum(scores.amax(-1), sink)  # [b, H]
        probs = torch.exp(scores - peak.unsqueeze(-1))
        denominator = probs.sum(-1) + torch.exp(sink - peak)
        weights = probs / denominator.unsqueeze(-1)  # [b, H, L + C]
        mixed = torch.einsum("bhl,bld->bhd", weights[..., :width], gathered)
        if dense is not None:
            mixed += torch.einsum("bhc,cd->bhd", weights[..., width:], dense_keys)
        out[lo:hi] = mixed.to(q.dtype)
    return out

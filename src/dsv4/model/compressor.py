"""The compressor: learned gated pooling of ``ratio`` tokens into one KV entry.

Every token contributes a projection ``a`` and gate logits ``z`` (plus a learned bias per
position inside its block). Entry i is a per-channel softmax over the gate logits of its slots,
weighting the matching projections. With ratio 4 (CSA) the windows overlap: entry i pools the
first halves of block i-1's four tokens and the second halves of block i's four tokens. Other
ratios (HCA) pool their own block only. An entry exists once the last token of its block has
been seen; it is normalised, rotated at the position of its block's first token, and (in
reference numerics) rounded like the deployment cache.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model import quant
from dsv4.model.kv_state import CompressorBuffer
from dsv4.model.linear import Numerics, PlainLinear
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import RopeTable, apply_rope, rope_cos_sin


class Compressor(nn.Module):
    """Main (``head_dim`` wide) or indexer (``index_head_dim`` wide, ``rotate``) compressor."""

    def __init__(self, dim: int, head_dim: int, rope_dim: int, ratio: int, eps: float,
                 rope: RopeTable, numerics: Numerics, rotate: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        self.ratio = ratio
        self.overlap = ratio == 4
        self.rotate = rotate  # indexer keys: Hadamard rotation + FP4 rounding instead of FP8
        self.numerics = numerics
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width), requires_grad=False)  # float32 in checkpoints
        self.wkv = PlainLinear(dim, width, compute_dtype=torch.float32)
        self.wgate = PlainLinear(dim, width, compute_dtype=torch.float32)
        self.norm = RMSNorm(head_dim, eps)
        self.rope = rope

    def forward(self, x: torch.Tensor, start: int, buffer: CompressorBuffer) -> torch.Tensor:
        """Feed tokens [start, start + n) (x: [n, dim], normalised block input); update
        ``buffer`` and return the entries completed by them, [k, head_dim] in x's dtype."""
        n = x.shape[0]
        m = self.ratio
        kv = self.wkv(x)  # [n, width] float32
        positions = torch.arange(start, start + n, device=x.device)
        score = self.wgate(x) + self.ape.float()[positions % m]  # [n, width]

        # Rows of the open block before this chunk, then the chunk: positions [block0 * m, end).
        block0 = start // m
        filled = start - block0 * m
        rows_kv = torch.cat((buffer.kv[:filled], kv))
        rows_score = torch.cat((buffer.score[:filled], score))
        end = start + n
        complete = end // m - block0  # blocks closed by this chunk
        done = complete * m

        entries = None
        if complete:
            block_kv = rows_kv[:done].unflatten(0, (complete, m))  # [k, m, width]
            block_score = rows_score[:done].unflatten(0, (complete, m))
            if self.overlap:
                pooled = self._pool_overlapping(block_kv, block_score, buffer)
                buffer.prev_kv = block_kv[-1].clone()
                buffer.prev_score = block_score[-1].clone()
            else:
                pooled = (block_kv * block_score.softmax(dim=1)).sum(dim=1)  # [k, head_dim]
            entries = self._finish(pooled.to(x.dtype), first_block=block0)

        # Keep the still-open block's rows for the next chunk.
        rest = rows_kv.shape[0] - done
        buffer.kv[:rest] = rows_kv[done:]
        buffer.score[:rest] = rows_score[done:]
        if entries is None:
            return x.new_zeros(0, self.head_dim)
        return entries

    def _pool_overlapping(self, block_kv: torch.Tensor, block_score: torch.Tensor,
                          buffer: CompressorBuffer) -> torch.Tensor:
        """Pool 2m slots per entry: previous block's first halves, own block's second halves."""
        d = self.head_dim
        prev_kv = torch.cat((buffer.prev_kv.unsqueeze(0), block_kv[:-1]))  # [k, m, 2d]
        prev_score = torch.cat((buffer.prev_score.unsqueeze(0), block_score[:-1]))
        slots_kv = torch.cat((prev_kv[..., :d], block_kv[..., d:]), dim=1)  # [k, 2m, d]
        slots_score = torch.cat((prev_score[..., :d], block_score[..., d:]), dim=1)
        return (slots_kv * slots_score.softmax(dim=1)).sum(dim=1)  # [k, d]

    def _finish(self, pooled: torch.Tensor, first_block: int) -> torch.Tensor:
        """Normalise, rotate at each block's first position, round as the deployment cache."""
        entries = self.norm(pooled)
        k = entries.shape[0]
        positions = (first_block + torch.arange(k, device=entries.device)) * self.ratio
        cos, sin = rope_cos_sin(self.rope.frequencies(entries.device), positions, torch.float32)
        entries = apply_rope(entries, cos, sin)
        if self.numerics.reference:
            if self.rotate:
                entries = quant.fp4_round_trip(quant.hadamard(entries), 32)
            else:
                entries = quant.fp8_round_nope(entries, self.head_dim - self.rope_dim)
        return entries

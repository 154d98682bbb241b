"""The Lightning Indexer of CSA layers: picks the top-k compressed entries for every query.

It runs its own overlapping ratio-4 compressor to make one small key per compressed entry, and
scores entry s for query t as sum_h w[t, h] * relu(q[t, h] . k[s]). Only entries whose block is
complete by position t are candidates. Equal scores are broken towards the lower entry index,
so a full forward and incremental decoding always select the same entries.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model import quant
from dsv4.model.compressor import Compressor
from dsv4.model.kv_state import LayerState
from dsv4.model.linear import Numerics, PlainLinear, QuantLinear
from dsv4.model.rope import RopeTable, apply_rope

# Upper bound on elements of one [query rows, entries] working tensor; larger problems are
# processed in blocks of query rows so that activation memory does not grow with context.
_SCORE_BUDGET = 1 << 22


class Indexer(nn.Module):
    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int,
                 topk: int, eps: float, rope: RopeTable, numerics: Numerics, weight_fmt: str):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        self.topk = topk
        self.numerics = numerics
        self.wq_b = QuantLinear(q_lora_rank, n_heads * head_dim, weight_fmt, numerics)
        self.weights_proj = PlainLinear(dim, n_heads)
        self.compressor = Compressor(dim, head_dim, rope_dim, 4, eps, rope, numerics, rotate=True)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int, state: LayerState) -> torch.Tensor:
        """Selected entry indices [n, k] (-1 = none) for tokens [start, start + n) of one sequence.

        x: [n, dim] normalised block input; qr: [n, q_lora_rank] the attention's normalised
        low-rank query; cos/sin: [n, rope_dim / 2] of the tokens' positions. Appends the index
        keys of blocks completed by these tokens to ``state.index_keys``.
        """
        n = x.shape[0]
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))  # [n, Hi, Di]
        q = apply_rope(q, cos, sin)
        if self.numerics.reference:
            q = quant.fp4_round_trip(quant.hadamard(q), 32)
        new_keys = self.compressor(x, start, state.index_compressor)
        state.index_keys.append(new_keys)
        keys = state.index_keys.view(q.dtype)  # [C, Di]
        weights = self.weights_proj(x) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [n, Hi]

        entries = keys.shape[0]
        k = min(self.topk, entries)
        selected = torch.full((n, k), -1, dtype=torch.long, device=x.device)
        if k == 0:
            return selected
        # Query t sees entries s < (t + 1) // 4.
        visible = (torch.arange(start + 1, start + n + 1, device=x.device) // 4)  # [n]
        rows_per_block = max(1, _SCORE_BUDGET // max(1, entries * self.n_heads))
        for lo in range(0, n, rows_per_block):
            hi = min(n, lo + rows_per_block)
            scores = torch.einsum("thd,sd->tsh", q[lo:hi], keys).relu_()  # [b, C, Hi]
            scores = scores.mul_(weights[lo:hi].unsqueeze(1)).sum(-1).float()  # [b, C]
            selected[lo:hi] = select_topk(scores, visible[lo:hi], k)
        return selected


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best visible entries per row, lower index first among equal scores.

    scores: [b, C] float; visible: [b] count of leading visible entries; returns [b, k] long in
    ascending index order, padded with -1 where a row has fewer than k visible entries.
    """
    b, entries = scores.shape
    masked = scores.clone()  # [b, C]
    first_hidden = int(visible.min()) if b else entries  # columns before it are visible in every row
    if first_hidden < entries:
        tail = torch.arange(first_hidden, entries, device=scores.device)
        masked[:, first_hidden:].masked_fill_(tail.unsqueeze(0) >= visible.unsqueeze(1), float("-inf"))
    values, picked = masked.topk(k, dim=-1)  # [b, k], best first
    threshold = values[:, -1:]  # [b, 1], the k-th best score
    # topk breaks ties arbitrarily. Its choice follows the rule only where it took every entry
    # equal to the threshold and the threshold is a real score.
    all_taken = (masked == threshold).sum(-1) == (values == threshold).sum(-1)
    # NaN scores (topk ranks them first) also go the slow way, which never selects them.
    unambiguous = all_taken & (threshold[:, 0] > float("-inf")) & ~values.isnan().any(-1)
    result = picked.sort(dim=-1).values
    rows = (~unambiguous).nonzero().flatten()
    if rows.numel():
        result[rows] = _select_with_ties(masked[rows], visible[rows], k)
    return result


def _select_with_ties(masked: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """select_topk for rows whose k-th best score is tied or -inf; masked: [b, C] with hidden
    entries at -inf."""
    b, entries = masked.shape
    columns = torch.arange(entries, device=masked.device)
    is_visible = columns.unsqueeze(0) < visible.unsqueeze(1)  # [b, C]
    threshold = masked.topk(k, dim=-1).values[:, -1:]  # [b, 1]
    above = masked > threshold
    at = (masked == threshold) & is_visible
    # Take as many entries equal to the threshold as are needed, lowest index first.
    needed = k - above.sum(-1, keepdim=True)
    chosen = above | (at & (at.cumsum(-1) <= needed))
    # Rows with fewer than k visible entries choose all of them (threshold is -inf there).
    chosen &= is_visible
    # Compact the chosen columns of each row to the left, in ascending order, -1 after them.
    order = torch.where(chosen, columns.unsqueeze(0), entries)
    order = order.topk(k, dim=-1, largest=False, sorted=True).values
    return torch.where(order == entries, torch.full_like(order, -1), order)

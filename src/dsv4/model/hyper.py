"""Manifold-constrained hyper-connections: the residual is ``hc_mult`` streams mixed per sublayer.

Each site (around attention, around the MoE) projects the RMS-normalised flattened streams to
``pre`` weights (collapse the streams into the sublayer input), ``post`` weights (spread the
sublayer output back) and a ``comb`` matrix made doubly stochastic by Sinkhorn iterations that
mixes the old streams. Output stream k receives sum_j comb[j, k] * stream_j: the matrix is
applied transposed, which is the direction DeepSeek's reference uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hc_project(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """Mixing logits before scale and bias: [T, hc, d] streams -> [T, fn.shape[0]] float32.

    The streams are flattened stream-major and RMS-normalised without a weight.
    """
    x = streams.flatten(-2).float()  # [T, hc * d]
    inv_rms = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return F.linear(x, fn.float()) * inv_rms


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly stochastic matrix from [..., hc, hc] logits: softmax over the last axis plus eps,
    a column normalisation, then (iters - 1) rounds of row then column normalisation."""
    comb = logits.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               iters: int, hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre [T, hc], post [T, hc] and comb [T, hc, hc] (float32) for one mixing site."""
    hc = streams.shape[-2]
    z = hc_project(streams, fn, norm_eps)  # [T, (2 + hc) * hc]
    base = base.float()
    scale = scale.float()
    pre = torch.sigmoid(z[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(z[:, hc: 2 * hc] * scale[1] + base[hc: 2 * hc])
    comb_logits = (z[:, 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    return pre, post, sinkhorn(comb_logits, iters, hc_eps)


def hc_collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j * stream_j: [T, hc, d] -> [T, d] in the streams' dtype (sum in float32)."""
    return (pre.unsqueeze(-1) * streams.float()).sum(-2).to(streams.dtype)


def hc_expand(output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams [T, hc, d]: post_k * output + sum_j comb[j, k] * stream_j."""
    mixed = torch.einsum("tjk,tjd->tkd", comb, streams.float())
    return (post.unsqueeze(-1) * output.float().unsqueeze(-2) + mixed).to(streams.dtype)


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams before the last norm: [T, hc, d] -> [T, d]."""
    z = hc_project(streams, fn, norm_eps)
    pre = torch.sigmoid(z * scale.float() + base.float()) + hc_eps
    return hc_collapse(streams, pre)

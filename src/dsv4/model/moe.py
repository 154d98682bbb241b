"""Mixture of experts: sqrt(softplus) router, token-id hash routing, SwiGLU experts with a clamp.

Router scores s = sqrt(softplus(x W^T)) in float32. Learned layers pick the top-k of s + bias
(the bias steers selection only); hash layers take the experts of ``tid2eid[token id]``. The
weights are the unbiased scores of the chosen experts, divided by their sum and multiplied by
``routed_scaling_factor``. An expert multiplies its SwiGLU activation by the routing weight
before its down projection. If a hash row names one expert twice, that expert runs once for
the token (DeepSeek's reference does the same; transformers would add it twice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.linear import Numerics, PlainLinear, QuantLinear


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, hashed: bool):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.route_scale = config.routed_scaling_factor
        self.hashed = hashed
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size,
                                               dtype=torch.bfloat16), requires_grad=False)
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights [T, k] float32 and expert indices [T, k] for x [T, dim]."""
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()  # [T, E]
        if self.hashed:
            indices = self.tid2eid[token_ids]
        else:
            indices = (scores + self.bias.float()).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale
        return weights, indices


class Expert(nn.Module):
    """SwiGLU MLP: w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L) * routing weight)."""

    def __init__(self, dim: int, inter_dim: int, fmt: str, numerics: Numerics, swiglu_limit: float):
        super().__init__()
        self.w1 = QuantLinear(dim, inter_dim, fmt, numerics)
        self.w2 = QuantLinear(inter_dim, dim, fmt, numerics)
        self.w3 = QuantLinear(dim, inter_dim, fmt, numerics)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.w1(x).float()
        up = self.w3(x).float()
        if self.swiglu_limit > 0:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
        hidden = F.silu(gate) * up
        if weights is not None:
            hidden = hidden * weights
        return self.w2(hidden.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hashed: bool, numerics: Numerics):
        super().__init__()
        dim, inter = config.hidden_size, config.moe_intermediate_size
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config, hashed)
        expert_fmt = config.expert_dtype
        self.experts = nn.ModuleList(
            Expert(dim, inter, expert_fmt, numerics, config.swiglu_limit) for _ in range(self.n_experts))
        shared_fmt = "fp8" if config.weight_dtype == "fp8" else "bf16"
        self.shared_experts = (Expert(dim, inter, shared_fmt, numerics, config.swiglu_limit)
                               if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, dim], token_ids: [T] -> [T, dim] (sum of experts accumulated in float32)."""
        weights, indices = self.gate(x, token_ids)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).tolist()
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            rows, slots = torch.nonzero(indices == expert_id, as_tuple=True)
            # A token that lists this expert twice (hash rows may) is served once.
            rows, first = _unique_rows(rows)
            slots = slots[first]
            expert = self.experts[expert_id]
            out[rows] += expert(x[rows], weights[rows, slots].unsqueeze(-1)).float()
        if self.shared_experts is not None:
            out += self.shared_experts(x).float()
        return out.to(x.dtype)


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of a sorted row list and the position of each one's first occurrence."""
    if rows.numel() <= 1:
        return rows, torch.arange(rows.numel(), device=rows.device)
    keep = torch.ones_like(rows, dtype=torch.bool)
    keep[1:] = rows[1:] != rows[:-1]
    return rows[keep], torch.nonzero(keep, as_tuple=True)[0]

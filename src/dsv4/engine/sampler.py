"""Sampling parameters and token sampling from logits.

Greedy when ``temperature`` is 0; otherwise temperature, then top-k, then top-p filtering and a
draw from a per-request ``torch.Generator`` seeded by ``seed`` (so a request is reproducible no
matter which other requests share its batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; need a detokenizer in the engine
    logprobs: int | None = None  # None = no logprobs; n >= 0 = the sampled token and n alternatives
    ignore_eos: bool = False
    # Test hook: emit these token ids in order instead of sampling (the model still runs on them).
    forced_tokens: list[int] | None = None
    speculative: bool = True  # use the engine's drafter for this request when it has one

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 or None, got {self.logprobs}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [V] with the top-k / top-p tail set to -inf."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = scaled.sort(descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        before = probs.cumsum(-1) - probs
        drop = before >= params.top_p
        scaled = scaled.clone()
        scaled[order[drop]] = float("-inf")
    return scaled


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token id from logits [V] float32."""
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    # Inverse-CDF draw: one uniform number per token, much cheaper than torch.multinomial over
    # a 129K vocabulary. A token of probability 0 can never be the first one whose CDF exceeds u.
    cdf = probs.double().cumsum(-1)  # [V]
    u = torch.rand((1,), generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    return min(index, probs.shape[-1] - 1)


def token_logprob(logits: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """Log-softmax of the unmodified logits [V] at ``token_id`` plus the ``top`` best tokens."""
    logprobs = logits.float().log_softmax(-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        best = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(token_id, float(logprobs[token_id]), best)

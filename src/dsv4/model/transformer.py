"""The DeepSeek-V4 network: embedding, hyper-connected blocks, head collapse, norm, LM head, MTP.

Notation used in shapes: T tokens of a flattened batch, hc residual streams, d hidden size,
V vocabulary. A batch is a list of ``Segment``s, each a contiguous chunk of one sequence with
its own ``SequenceState``, so that one call can mix a prefill chunk of one sequence with decode
steps of others (no padding anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model import hyper
from dsv4.model.attention import Attention, Segment
from dsv4.model.kv_state import LayerState, SequenceState
from dsv4.model.linear import Numerics, PlainLinear, QuantLinear
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm


@dataclass
class Chunk:
    """Tokens [offset, offset + length) of a flattened batch: positions [start, start + length)
    of the sequence whose attention state is ``state``."""

    offset: int
    length: int
    start: int
    state: SequenceState


class Block(nn.Module):
    """Attention and MoE sublayers, each wrapped in a hyper-connection mixing site."""

    def __init__(self, config: ModelConfig, ratio: int, hashed: bool, numerics: Numerics):
        super().__init__()
        self.config = config
        d, hc = config.hidden_size, config.hc_mult
        mix = (2 + hc) * hc
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(config, ratio, numerics)
        self.ffn = MoE(config, hashed, numerics)
        for site in ("attn", "ffn"):  # float32 in checkpoints
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, hc * d), requires_grad=False))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.zeros(mix), requires_grad=False))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.zeros(3), requires_grad=False))

    def _mix(self, streams: torch.Tensor, site: str):
        c = self.config
        return hyper.hc_weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                                getattr(self, f"hc_{site}_scale"), c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        """streams: [T, hc, d] -> [T, hc, d]."""
        pre, post, comb = self._mix(streams, "attn")
        out = self.attn(self.attn_norm(hyper.hc_collapse(streams, pre)), positions, segments)
        streams = hyper.hc_expand(out, streams, post, comb)

        pre, post, comb = self._mix(streams, "ffn")
        out = self.ffn(self.ffn_norm(hyper.hc_collapse(streams, pre)), token_ids)
        return hyper.hc_expand(out, streams, post, comb)


class MTPBlock(Block):
    """Multi-token prediction: predicts token t+2 from the main streams at t and token t+1."""

    def __init__(self, config: ModelConfig, ratio: int, numerics: Numerics):
        super().__init__(config, ratio, hashed=False, numerics=numerics)
        d = config.hidden_size
        fmt = "fp8" if config.weight_dtype == "fp8" else "bf16"
        self.e_proj = QuantLinear(d, d, fmt, numerics)
        self.h_proj = QuantLinear(d, d, fmt, numerics)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        hc = config.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * d), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.zeros(hc), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.zeros(1), requires_grad=False)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, numerics: str | Numerics = "reference",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.numerics = numerics if isinstance(numerics, Numerics) else Numerics(numerics)
        if self.numerics.reference:
            config.check_reference_numerics()
        self.dtype = dtype
        d, hc = config.hidden_size, config.hc_mult
        # Given weights skip nn.init, whose first call imports sympy (~70 MiB of resident memory).
        self.embed = nn.Embedding(config.vocab_size, d, _weight=torch.zeros(config.vocab_size, d, dtype=torch.bfloat16),
                                  _freeze=True)
        self.layers = nn.ModuleList(
            Block(config, ratio, hashed=i < config.num_hash_layers, numerics=self.numerics)
            for i, ratio in enumerate(config.layer_ratios))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = PlainLinear(d, config.vocab_size, compute_dtype=torch.float32)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * d), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.zeros(hc), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.mtp = nn.ModuleList(MTPBlock(config, ratio, self.numerics) for ratio in config.mtp_ratios)

    # ------------------------------------------------------------------ state

    def new_state(self, store_factory=None) -> SequenceState:
        """A fresh attention state for one sequence (every layer and MTP block)."""
        c = self.config
        device = self.embed.weight.device

        def layer_state(ratio: int) -> LayerState:
            return LayerState(ratio, c.sliding_window, c.head_dim, c.index_head_dim, self.dtype, device,
                              store_factory)

        return SequenceState([layer_state(r) for r in c.layer_ratios], [layer_state(r) for r in c.mtp_ratios])

    def cache_dequantized_weights(self, budget_bytes: int) -> int:
        """Dequantize every FP8/FP4/bf16 linear weight once, if they fit in ``budget_bytes``.

        Logits stay bitwise the same; decoding skips the per-matmul dequantization. Returns the
        bytes cached, or 0 (and caches nothing) when the model is larger than the budget.
        """
        linears = [m for m in self.modules() if isinstance(m, QuantLinear)]
        needed = sum(m.out_features * m.in_features for m in linears) * self.dtype.itemsize
        if needed > budget_bytes:
            return 0
        return sum(m.cache_dequantized(self.dtype) for m in linears)

    # ------------------------------------------------------------------ forward passes

    def forward_streams(self, token_ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """Run every block over a flattened batch: token_ids [T] -> final streams [T, hc, d]."""
        positions = _positions(chunks, token_ids.device)
        streams = self.embed(token_ids).to(self.dtype)  # [T, d]
        streams = streams.unsqueeze(-2).expand(-1, self.config.hc_mult, -1).contiguous()  # [T, hc, d]
        for i, layer in enumerate(self.layers):
            segments = [Segment(c.offset, c.length, c.start, c.state.layers[i]) for c in chunks]
            streams = layer(streams, token_ids, positions, segments)
        return streams

    def logits_from_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """Head collapse, final norm and LM head in float32: [T, hc, d] -> [T, V]."""
        return self._vocab_logits(streams, self, self.norm)

    def _vocab_logits(self, streams: torch.Tensor, owner: nn.Module, norm: RMSNorm) -> torch.Tensor:
        """Collapse streams with ``owner``'s hc_head_* parameters, apply ``norm``, then the shared
        LM head in float32: [T, hc, d] -> [T, V]."""
        c = self.config
        x = hyper.hc_head(streams, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale,
                          c.hc_eps, c.rms_norm_eps)
        return self.head(norm(x))

    def mtp_logits(self, streams: torch.Tensor, next_ids: torch.Tensor, chunks: list[Chunk],
                   depth: int = 0) -> torch.Tensor:
        """MTP block ``depth``: main streams at positions p [T, hc, d] and the tokens at p + 1
        [T] -> logits [T, V] for the token at p + 2. Uses the chunks' MTP layer states."""
        block = self.mtp[depth]
        positions = _positions(chunks, streams.device)
        e = block.enorm(self.embed(next_ids).to(self.dtype))  # [T, d]
        h = block.hnorm(streams)  # [T, hc, d], normalised per stream
        x = block.e_proj(e).unsqueeze(-2) + block.h_proj(h)
        segments = [Segment(ch.offset, ch.length, ch.start, ch.state.mtp[depth]) for ch in chunks]
        x = block(x, next_ids, positions, segments)
        return self._vocab_logits(x, block, block.norm)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward from position 0 without a cache: [B, S] -> logits [B, S, V] float32."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        chunks = [Chunk(b * seq, seq, 0, self.new_state()) for b in range(batch)]
        streams = self.forward_streams(input_ids.reshape(-1), chunks)
        return self.logits_from_streams(streams).view(batch, seq, -1)


def _positions(chunks: list[Chunk], device) -> torch.Tensor:
    """Absolute position of every token of a flattened batch, [T] long."""
    parts = [torch.arange(c.start, c.start + c.length, device=device) for c in chunks]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

"""Random-weight models and prefill/decode sweep helpers of the engine tests."""

from __future__ import annotations

import torch

from dsv4.config import ModelConfig, load_preset
from dsv4.model.loading import build_from_tensors
from dsv4.model.transformer import Transformer
from support.random_weights import random_official_tensors


def random_model(preset: str | ModelConfig, numerics: str = "plain", seed: int = 0) -> Transformer:
    config = load_preset(preset) if isinstance(preset, str) else preset
    tensors = random_official_tensors(config, seed)
    return build_from_tensors(config, tensors.__getitem__, numerics=numerics, dtype=torch.float32)




def chunk_bounds(length: int, cuts: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of a prompt of ``length`` tokens cut at the given positions."""
    edges = [0] + sorted(c for c in set(cuts) if 0 < c < length) + [length]
    return list(zip(edges[:-1], edges[1:]))


def prefill_then_decode(runner, ids: list[int], lengths: list[int], cuts_of, decode: int = 8,
                        group: int = 100) -> dict[tuple[int, int], torch.Tensor]:
    """Logits of the engine path for every prompt length L in ``lengths``.

    Sequence L prefills ``ids[:L]`` in the chunks ``cuts_of(L)`` gives, then decodes ``decode``
    tokens one at a time, teacher-forced with ``ids``. Many sequences run in one model call (a
    batch of mixed prefill and decode chunks). Returns {(L, position): logits [V]} for the last
    prompt position and every decoded position.
    """
    from dsv4.engine.runner import RunItem

    out: dict[tuple[int, int], torch.Tensor] = {}
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"prompt lengths must be distinct, got {sorted(lengths)}")
    for first in range(0, len(lengths), group):
        batch = lengths[first: first + group]
        states = {L: runner.new_state(L + decode) for L in batch}
        spans = {L: chunk_bounds(L, cuts_of(L)) for L in batch}
        for round_index in range(max(len(s) for s in spans.values())):
            items, owners = [], []
            for L in batch:
                if round_index < len(spans[L]):
                    start, end = spans[L][round_index]
                    items.append(RunItem(states[L], ids[start:end], start, end - start - 1
                                         if end == L else end - start))
                    owners.append((L, end))
            for (L, end), result in zip(owners, runner.run(items)):
                if end == L:
                    out[(L, L - 1)] = result.logits[0]
        for step in range(decode):
            items = [RunItem(states[L], [ids[L + step]], L + step, 0) for L in batch]
            for L, result in zip(batch, runner.run(items)):
                out[(L, L + step)] = result.logits[0]
    return out


def worst_error(engine_logits: dict[tuple[int, int], torch.Tensor], full_logits: torch.Tensor):
    """Largest |difference| to the full forward and the (L, position) where it occurs."""
    worst, where = 0.0, None
    for key, logits in engine_logits.items():
        error = float((logits - full_logits[key[1]]).abs().max())
        if error > worst:
            worst, where = error, key
    return worst, where

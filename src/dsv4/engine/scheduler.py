"""Continuous-batching scheduler (plain Python, no torch).

Each step the scheduler picks, under a token budget, which sequences run and how many of their
tokens: first one decode step for every running sequence that finished its prompt, then prompt
chunks of sequences still prefilling, then newly admitted requests. Sequences join and leave
between steps; no sequence is ever padded. The scheduler only reads and writes counters of the
sequences it holds; the engine owns their tokens and tensors.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .cache_manager import CacheFullError, CacheManager

logger = logging.getLogger(__name__)


class SchedulableSequence(Protocol):
    request_id: str
    num_computed: int  # tokens already run through the model
    num_prompt: int  # prompt tokens (cached ones included)

    @property
    def num_known(self) -> int:
        """Tokens whose ids are known: the prompt plus every sampled token."""

    @property
    def max_context(self) -> int:
        """The largest context this sequence may reach (prompt + max new tokens)."""


@dataclass
class ScheduledChunk:
    """Run tokens [start, start + length) of ``sequence`` in this step."""

    sequence: SchedulableSequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        """True when the chunk's last token is at or past the prompt's last token."""
        return self.start + self.length >= self.sequence.num_prompt


@dataclass
class SchedulerConfig:
    max_batched_tokens: int = 2048  # tokens per model call, decode steps included
    max_running: int = 64  # sequences admitted at the same time
    prefill_chunk: int = 1024  # largest prompt chunk of one sequence in one step

    def __post_init__(self) -> None:
        for name in ("max_batched_tokens", "max_running", "prefill_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"scheduler setting {name} must be positive, got {getattr(self, name)}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheManager):
        self.config = config
        self.cache = cache
        self.waiting: deque[SchedulableSequence] = deque()
        self.running: list[SchedulableSequence] = []

    def add(self, sequence: SchedulableSequence) -> None:
        """Queue a request; raise CacheFullError if it could never fit the cache budget."""
        self.cache.check_fits(sequence.request_id, sequence.max_context)
        self.waiting.append(sequence)

    def remove(self, request_id: str) -> SchedulableSequence | None:
        """Drop a request from either queue and release its cache at once."""
        for queue in (self.running, self.waiting):
            for sequence in list(queue):
                if sequence.request_id == request_id:
                    queue.remove(sequence)
                    self.cache.release(request_id)
                    return sequence
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, extra_decode_tokens: dict[str, int] | None = None) -> list[ScheduledChunk]:
        """Chunks to run in the next step.

        ``extra_decode_tokens`` lets speculative decoding ask for more than one token of a
        decoding sequence (the draft tokens after the last sampled one).
        """
        budget = self.config.max_batched_tokens
        extra = extra_decode_tokens or {}
        chunks: list[ScheduledChunk] = []

        # 1. One decode step (plus drafts) for every sequence whose prompt is done.
        for sequence in self.running:
            if sequence.num_computed < sequence.num_prompt or budget <= 0:
                continue
            length = min(sequence.num_known - sequence.num_computed + extra.get(sequence.request_id, 0),
                         budget)
            if length > 0:
                chunks.append(ScheduledChunk(sequence, sequence.num_computed, length))
                budget -= length

        # 2. Continue prompts that are partly prefilled.
        for sequence in self.running:
            if sequence.num_computed >= sequence.num_prompt or budget <= 0:
                continue
            length = min(sequence.num_prompt - sequence.num_computed, self.config.prefill_chunk, budget)
            chunks.append(ScheduledChunk(sequence, sequence.num_computed, length))
            budget -= length

        # 3. Admit waiting requests while the budget, the running limit and the cache allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            sequence = self.waiting[0]
            if not self.cache.can_reserve(sequence.max_context):
                break
            self.waiting.popleft()
            try:
                self.cache.reserve(sequence.request_id, sequence.max_context)
            except CacheFullError:  # raced with can_reserve; retry next step
                self.waiting.appendleft(sequence)
                break
            self.running.append(sequence)
            # A restored snapshot covers at most prompt - 1 tokens, so at least one is left.
            length = min(sequence.num_prompt - sequence.num_computed, self.config.prefill_chunk, budget)
            chunks.append(ScheduledChunk(sequence, sequence.num_computed, length))
            budget -= length
        return chunks

    def finish(self, sequence: SchedulableSequence) -> None:
        """Remove a finished sequence and release its cache."""
        if sequence in self.running:
            self.running.remove(sequence)
        self.cache.release(sequence.request_id)

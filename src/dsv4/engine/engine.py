"""LLMEngine: requests in, tokens out, one ``step()`` = schedule -> run -> postprocess.

The engine is not thread-safe: a server drives it from one background thread and passes
``add_request`` / ``abort_request`` calls through that thread.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dsv4.model.transformer import Transformer

from . import snapshot
from .cache_manager import CacheManager, deployment_format, float_format
from .runner import ModelRunner, RunItem
from .sampler import SamplingParams, TokenLogprob, new_generator, sample, token_logprob
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)

# Models whose dequantized weights fit in this many bytes (the demo model does, the released
# ones do not) can skip the per-matmul dequantization; the CLI and the server use it.
SMALL_MODEL_CACHE_BYTES = 1 << 30


@dataclass
class EngineConfig:
    storage: str = "float"  # "float" (activation dtype) or "deployment" (FP8 KV, FP4 index keys)
    cache_budget_bytes: int | None = None  # None = no limit
    block_entries: int = 64  # compressed entries per cache block
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefix_cache: bool = False  # reuse stored prompt prefixes (see LLMEngine.cache_prefix)
    upcast_weights: bool = False  # cast bf16 weights once, not per matmul (see ModelRunner.upcast_weights)
    # Dequantize FP8/FP4 weights once when they fit in this many bytes (0 = per matmul, always).
    dequantized_cache_bytes: int = 0


@dataclass
class RequestOutput:
    """Progress of one request in one step (``new_*`` fields) and its totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_ids: list[int] = field(default_factory=list)  # every completion token so far


class Sequence:
    """One request inside the engine (implements the scheduler's SchedulableSequence)."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.output: list[int] = []
        self.num_prompt = len(prompt)
        self.num_computed = 0
        self.cached_tokens = 0
        self.state = None
        self.generator = new_generator(params.seed)
        self.finish_reason: str | None = None
        self.draft: list[int] = []
        self.text = ""
        self.new_tokens: list[int] = []
        self.new_logprobs: list[TokenLogprob] = []

    @property
    def num_known(self) -> int:
        return self.num_prompt + len(self.output)

    @property
    def max_context(self) -> int:
        return self.num_prompt + self.params.max_tokens

    def token_at(self, position: int) -> int:
        return self.prompt[position] if position < self.num_prompt else self.output[position - self.num_prompt]


class LLMEngine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None,
                 detokenize: Callable[[list[int]], str] | None = None, drafter=None):
        self.model = model
        self.config = config or EngineConfig()
        self.detokenize = detokenize
        self.drafter = drafter
        c = model.config
        element = torch.empty(0, dtype=model.dtype).element_size()
        if self.config.storage == "deployment":
            # Rope dims stay in the activation dtype; the window ring is the model's float ring.
            fmt = deployment_format(c, rope_element_bytes=element, window_entry_bytes=c.head_dim * element)
        else:
            fmt = float_format(c, element)
        self.cache = CacheManager(c, fmt, self.config.cache_budget_bytes, self.config.block_entries)
        self.scheduler = Scheduler(self.config.scheduler, self.cache)
        self.runner = ModelRunner(model, self.config.storage, self.config.block_entries)
        if self.config.upcast_weights:
            self.runner.upcast_weights()
        if self.config.dequantized_cache_bytes:
            cached = model.cache_dequantized_weights(self.config.dequantized_cache_bytes)
            logger.info("dequantized weights cached: %.1f MiB", cached / 2**20)
        self._sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._prefixes: snapshot.PrefixCache | None = None
        self._aborted: list[RequestOutput] = []  # reported by the next step()
        self.cache_hit_tokens = 0

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str | None, prompt_token_ids: list[int],
                    params: SamplingParams | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"request-{next(self._ids)}"
        if request_id in self._sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError(f"request {request_id!r} has an empty prompt; pass at least one token id")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token ids {bad[:5]} are outside [0, {vocab})")
        limit = self.model.config.max_position_embeddings
        if len(prompt) + params.max_tokens > limit:
            fix = (f"ask for at most {limit - len(prompt)} new tokens" if len(prompt) < limit
                   else f"shorten the prompt to at most {limit - 1} tokens")
            raise ValueError(f"request {request_id!r}: {len(prompt)} prompt tokens plus max_tokens="
                             f"{params.max_tokens} exceed the model's context of {limit} tokens "
                             f"(max_position_embeddings); {fix}")
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need a detokenizer; pass detokenize= to LLMEngine")
        sequence = Sequence(request_id, prompt, params)
        self.scheduler.add(sequence)
        self._sequences[request_id] = sequence
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request and free its cache now; False when it is unknown or finished."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is None:
            return False
        self.scheduler.remove(request_id)
        sequence.state = None
        sequence.finish_reason = "abort"
        if self.drafter is not None:
            self.drafter.forget(request_id)
        self._aborted.append(RequestOutput(request_id, [], None, True, "abort", sequence.num_prompt,
                                           len(sequence.output), sequence.cached_tokens,
                                           list(sequence.output)))
        logger.info("aborted request %s after %d tokens", request_id, len(sequence.output))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ------------------------------------------------------------------ prefix snapshots

    @property
    def prefixes(self) -> snapshot.PrefixCache:
        if self._prefixes is None:
            self._prefixes = snapshot.PrefixCache(snapshot.model_fingerprint(self.model))
        return self._prefixes

    def cache_prefix(self, token_ids: list[int]) -> snapshot.Prefix:
        """Prefill ``token_ids`` on a scratch state and keep the result for later prompts."""
        ids = [int(t) for t in token_ids]
        state = self.runner.new_state(len(ids))
        chunk = self.config.scheduler.prefill_chunk
        for start in range(0, len(ids), chunk):
            piece = ids[start: start + chunk]
            self.runner.run([RunItem(state, piece, start, len(piece))])
        return self.prefixes.add(ids, state)

    def _attach_state(self, sequence: Sequence) -> None:
        sequence.state = self.runner.new_state(sequence.max_context)
        if not self.config.prefix_cache or self._prefixes is None:
            return
        prefix = self._prefixes.longest_match(sequence.prompt)
        if prefix is None:
            return
        snapshot.restore(sequence.state, prefix.state)
        sequence.num_computed = sequence.cached_tokens = len(prefix.token_ids)
        self.cache_hit_tokens += sequence.cached_tokens
        logger.debug("request %s reuses a %d-token prefix", sequence.request_id, sequence.cached_tokens)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Schedule -> run -> postprocess; return one output per request that progressed."""
        drafts = {rid: len(s.draft) for rid, s in self._sequences.items() if s.draft}
        chunks = self.scheduler.schedule(drafts)
        for chunk in chunks:
            sequence = chunk.sequence
            if sequence.state is None:
                self._attach_state(sequence)
                # A restored prefix moves the start; the scheduler counted from 0.
                chunk.start = sequence.num_computed
                chunk.length = min(chunk.length, sequence.num_prompt - sequence.num_computed)
        items, rollbacks = self._build_items(chunks)
        results = self.runner.run(items)
        aborted, self._aborted = self._aborted, []
        return aborted + self._postprocess(chunks, items, results, rollbacks)

    def _build_items(self, chunks: list[ScheduledChunk]):
        items, rollbacks = [], []
        keep_streams = self.drafter is not None and self.drafter.needs_streams
        for chunk in chunks:
            sequence = chunk.sequence
            tokens = [sequence.token_at(p) for p in range(chunk.start, min(chunk.start + chunk.length,
                                                                            sequence.num_known))]
            drafts = sequence.draft[: max(0, chunk.start + chunk.length - sequence.num_known)]
            tokens += drafts
            # Rows to sample from: the last known token and every draft after it.
            last_known = sequence.num_known - 1
            first_row = len(tokens) if last_known >= chunk.start + len(tokens) else last_known - chunk.start
            rollbacks.append(snapshot.capture(sequence.state, with_entries=False, include_mtp=False)
                             if drafts else None)
            items.append(RunItem(sequence.state, tokens, chunk.start, first_row, keep_streams))
        return items, rollbacks

    def _postprocess(self, chunks, items, results, rollbacks) -> list[RequestOutput]:
        redo: list[tuple[Sequence, RunItem]] = []
        advanced: list[tuple[Sequence, torch.Tensor | None]] = []
        for chunk, item, result, rollback in zip(chunks, items, results, rollbacks):
            sequence = chunk.sequence
            drafts = item.token_ids[item.logits_from + 1:]
            sequence.num_computed = chunk.start + len(item.token_ids)
            accepted = 0
            for row, logits in enumerate(result.logits):
                token = self._choose(sequence, logits)
                self._append(sequence, token, logits)
                if sequence.finish_reason is not None:
                    break
                if row < len(drafts) and token == drafts[row]:
                    accepted += 1
                    continue
                break
            sequence.draft = []
            if drafts and accepted < len(drafts) and sequence.finish_reason is None:
                # Rejected drafts: rewind, then rerun the tokens that were kept.
                snapshot.restore(sequence.state, rollback)
                kept = item.token_ids[: len(item.token_ids) - len(drafts) + accepted]
                sequence.num_computed = chunk.start + len(kept)
                redo.append((sequence, RunItem(sequence.state, kept, chunk.start, len(kept),
                                               item.keep_streams)))
            else:
                advanced.append((sequence, result.streams))
        if redo:
            rerun = self.runner.run([item for _, item in redo])
            advanced += [(sequence, result.streams) for (sequence, _), result in zip(redo, rerun)]
        if self.drafter is not None:
            self.drafter.advance(self, advanced)
        return self._collect(chunks)

    def _choose(self, sequence: Sequence, logits: torch.Tensor) -> int:
        forced = sequence.params.forced_tokens
        if forced is not None and len(sequence.output) < len(forced):
            return int(forced[len(sequence.output)])
        return sample(logits, sequence.params, sequence.generator)

    def _append(self, sequence: Sequence, token: int, logits: torch.Tensor) -> None:
        params = sequence.params
        sequence.output.append(token)
        sequence.new_tokens.append(token)
        if params.logprobs is not None:
            sequence.new_logprobs.append(token_logprob(logits, token, params.logprobs))
        eos = self.model.config.eos_token_id
        if token in params.stop_token_ids or (token == eos and not params.ignore_eos):
            sequence.finish_reason = "stop"
        elif params.stop and self._hits_stop_string(sequence):
            sequence.finish_reason = "stop"
        elif len(sequence.output) >= params.max_tokens:
            sequence.finish_reason = "length"

    def _hits_stop_string(self, sequence: Sequence) -> bool:
        sequence.text = self.detokenize(sequence.output)
        return any(stop in sequence.text for stop in sequence.params.stop)

    def _collect(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        outputs = []
        for chunk in chunks:
            sequence = chunk.sequence
            if not sequence.new_tokens and sequence.finish_reason is None:
                continue
            finished = sequence.finish_reason is not None
            outputs.append(RequestOutput(
                sequence.request_id, sequence.new_tokens, sequence.new_logprobs if sequence.params.logprobs
                is not None else None, finished, sequence.finish_reason, sequence.num_prompt,
                len(sequence.output), sequence.cached_tokens, list(sequence.output)))
            sequence.new_tokens, sequence.new_logprobs = [], []
            if finished:
                self._finish(sequence)
        return outputs

    def _finish(self, sequence: Sequence) -> None:
        self.scheduler.finish(sequence)
        self._sequences.pop(sequence.request_id, None)
        sequence.state = None
        if self.drafter is not None:
            self.drafter.forget(sequence.request_id)

    # ------------------------------------------------------------------ conveniences

    def metrics(self) -> dict:
        """Running and waiting counts and the cache bytes held, per layer kind."""
        held: dict[str, int] = {}
        for sequence in self._sequences.values():
            if sequence.state is not None:
                for kind, value in self.runner.held_bytes(sequence.state).items():
                    held[kind] = held.get(kind, 0) + value
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "cache_bytes": held, "cache_bytes_reserved": self.cache.bytes_in_use_by_kind(),
                "cache_hit_tokens": self.cache_hit_tokens}

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding outputs as they come."""
        while self.has_unfinished_requests():
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion together; one final output per prompt, in order."""
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(None, prompt, p))
        except ValueError:
            for request_id in ids:  # all prompts or none
                self.abort_request(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        for output in self.stream():
            if output.finished:
                final[output.request_id] = output
        return [final[i] for i in ids]


"""Speculative decoding: drafters that propose the next tokens of greedy requests.

The engine feeds ``[last sampled token, draft_1, ..., draft_k]`` as one chunk, samples from
every row, keeps the drafts up to the first mismatch plus one token from the model, and on a
mismatch rewinds the state (window ring, compressor buffers, store lengths) and reruns the
kept tokens. The tokens emitted are therefore those of plain greedy decoding, whatever the
drafter proposes; a good drafter only makes it faster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def _wants_draft(sequence) -> bool:
    params = sequence.params
    return (sequence.finish_reason is None and params.greedy and params.speculative
            and params.forced_tokens is None and sequence.output
            and sequence.num_computed == sequence.num_known - 1)


def _room(sequence, k: int) -> int:
    """Drafts that still fit: the verify step emits up to k + 1 tokens within max_tokens."""
    return max(0, min(k, sequence.params.max_tokens - len(sequence.output) - 1))


class FunctionDrafter:
    """Drafts from ``propose(sequence) -> token ids`` (tests use oracle and random proposers)."""

    needs_streams = False

    def __init__(self, propose: Callable[[object], list[int]], max_draft: int = 3):
        self.propose = propose
        self.max_draft = max_draft

    def advance(self, engine, advanced) -> None:
        for sequence, _ in advanced:
            if _wants_draft(sequence):
                sequence.draft = list(self.propose(sequence))[: _room(sequence, self.max_draft)]

    def forget(self, request_id: str) -> None:
        pass


class MTPDrafter:
    """One draft token per step from the model's MTP block (depth 0).

    The MTP block at position p reads the main model's final streams at p and the token at
    p + 1, so it runs one position behind the main model: the drafter keeps the streams of the
    positions it has not fed yet and feeds them once the next token is known.
    """

    needs_streams = True

    def __init__(self):
        self._pending: dict[str, torch.Tensor] = {}  # request id -> streams [n, hc, d]
        self.proposed = 0

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def advance(self, engine, advanced) -> None:
        states, streams, next_ids, starts, owners = [], [], [], [], []
        for sequence, new_streams in advanced:
            if sequence.finish_reason is not None or new_streams is None or not engine.model.mtp:
                self.forget(sequence.request_id)
                continue
            mtp_length = sequence.state.mtp[0].length
            pending = self._pending.get(sequence.request_id)
            have = mtp_length + (0 if pending is None else pending.shape[0])
            first_new = sequence.num_computed - new_streams.shape[0]
            if have != first_new:
                # The MTP state cannot catch up (for example after a restored prefix): no drafts.
                self.forget(sequence.request_id)
                continue
            pending = new_streams if pending is None else torch.cat((pending, new_streams))
            upto = min(sequence.num_computed, sequence.num_known - 1)  # next token must be known
            count = upto - mtp_length
            if count <= 0:
                self._pending[sequence.request_id] = pending
                continue
            states.append(sequence.state)
            streams.append(pending[:count])
            next_ids.append([sequence.token_at(p + 1) for p in range(mtp_length, upto)])
            starts.append(mtp_length)
            owners.append(sequence)
            self._pending[sequence.request_id] = pending[count:]
        if not owners:
            return
        last_logits = engine.runner.run_mtp(states, streams, next_ids, starts)
        for sequence, logits in zip(owners, last_logits):
            if _wants_draft(sequence) and sequence.state.mtp[0].length == sequence.num_computed:
                sequence.draft = [int(logits.argmax())][: _room(sequence, 1)]
                self.proposed += len(sequence.draft)

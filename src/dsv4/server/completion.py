"""Turns a request's engine outputs into OpenAI chat-completion deltas and a final message.

Token ids go through the chat format's streaming parser, which splits reasoning, content and
DSML tool calls. Calls are released whole (``atomic_calls``), so a call the parser rejects
never reaches the client; its raw text comes back as content and the error is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dsv4.chat import (ContentDelta, MessageEnd, ParseError, ParseWarning, ReasoningDelta, StreamParser,
                       Tokenizer, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart)
from dsv4.engine.engine import RequestOutput
from dsv4.engine.sampler import TokenLogprob

logger = logging.getLogger(__name__)


@dataclass
class CompletionState:
    """What one request produced so far, for the final message and the usage block."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class StopTrimmer:
    """Holds back the end of a text stream that could begin a stop string, and cuts the text
    at the first stop string, which OpenAI's API never returns."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        if self.hold == 0:
            out, self.pending = self.pending, ""
            return out
        out, self.pending = self.pending[:-self.hold], self.pending[-self.hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class CompletionBuilder:
    def __init__(self, request_id: str, tokenizer: Tokenizer, thinking: bool, tools: list | None,
                 tool_choice: Any, parallel_tool_calls: bool, top_logprobs: int | None,
                 stop: list[str] | None = None):
        parser_tools = [] if tool_choice == "none" else tools or []
        self.request_id = request_id
        self.tokenizer = tokenizer
        self.parser = StreamParser("thinking" if thinking else "chat", parser_tools, tokenizer=tokenizer,
                                   atomic_calls=True)
        self.parallel_tool_calls = parallel_tool_calls
        self.top_logprobs = top_logprobs
        self.in_reasoning = thinking
        self.state = CompletionState()
        self._calls_started = 0
        self._dropped_calls: set[int] = set()
        self._trim = {"reasoning_content": StopTrimmer(stop or []), "content": StopTrimmer(stop or [])}

    def feed(self, output: RequestOutput) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """Deltas (OpenAI ``delta`` objects) and logprob entries for one engine output."""
        state = self.state
        state.prompt_tokens = output.prompt_tokens
        state.completion_tokens = output.completion_tokens
        state.cached_tokens = output.cached_tokens
        for token in output.new_token_ids:
            if self.in_reasoning:
                state.reasoning_tokens += 1
                if token == self.tokenizer.think_end_id:
                    self.in_reasoning = False
        events = self.parser.feed_ids(output.new_token_ids)
        if output.finished:
            events += self.parser.finish(output.finish_reason or "stop")
            state.finish_reason = output.finish_reason
        deltas = [d for d in (self._convert(event) for event in events) if d is not None]
        deltas = self._apply_stops(deltas, final=output.finished)
        logprobs = None
        if output.new_logprobs is not None:
            logprobs = [self._logprob_entry(item) for item in output.new_logprobs]
            state.logprobs.extend(logprobs)
        return deltas, logprobs

    def _apply_stops(self, deltas: list[dict[str, Any]], final: bool) -> list[dict[str, Any]]:
        """Cut text deltas at stop strings; keep the final state in step with what is sent."""
        out = []
        for delta in deltas:
            key = next((k for k in ("reasoning_content", "content") if k in delta), None)
            if key is None:
                out.append(delta)
                continue
            text = self._trim[key].feed(delta[key])
            if text:
                out.append({key: text})
        if final:
            for key, trimmer in self._trim.items():
                text = trimmer.flush()
                if text:
                    out.append({key: text})
        for delta in out:
            self.state.reasoning += delta.get("reasoning_content", "")
            self.state.content += delta.get("content", "")
        return out

    def _convert(self, event) -> dict[str, Any] | None:
        state = self.state
        if isinstance(event, ReasoningDelta):
            return {"reasoning_content": event.text}
        if isinstance(event, ContentDelta):
            return {"content": event.text}
        if isinstance(event, ToolCallStart):
            if self._calls_started and not self.parallel_tool_calls:
                self._dropped_calls.add(event.index)
                logger.warning("request %s: dropped tool call %r because parallel_tool_calls is false",
                               self.request_id, event.name)
                return None
            self._calls_started += 1
            return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                    "function": {"name": event.name, "arguments": ""}}]}
        if isinstance(event, ToolCallArgumentsDelta):
            if event.index in self._dropped_calls:
                return None
            return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
        if isinstance(event, ToolCallEnd):
            if event.index not in self._dropped_calls:
                state.tool_calls.append({"id": event.id, "type": "function",
                                         "function": {"name": event.name, "arguments": event.arguments}})
            return None
        if isinstance(event, ParseError):
            logger.warning("request %s: model output is not a valid tool call (%s); returned as content",
                           self.request_id, event.message)
            return {"content": event.raw} if event.raw else None
        if isinstance(event, ParseWarning):
            logger.info("request %s: %s", self.request_id, event.message)
            return None
        if isinstance(event, MessageEnd):
            if state.tool_calls:
                state.finish_reason = "tool_calls"
            return None
        return None

    def _logprob_entry(self, item: TokenLogprob) -> dict[str, Any]:
        def describe(token_id: int, logprob: float) -> dict[str, Any]:
            raw = self.tokenizer.token_bytes([token_id])
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        entry = describe(item.token_id, item.logprob)
        entry["top_logprobs"] = [describe(t, lp) for t, lp in item.top[: self.top_logprobs or 0]]
        return entry

    def usage(self) -> dict[str, Any]:
        s = self.state
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
            "prompt_cache_hit_tokens": s.cached_tokens,
            "prompt_cache_miss_tokens": s.prompt_tokens - s.cached_tokens,
        }

    def message(self) -> dict[str, Any]:
        s = self.state
        message: dict[str, Any] = {"role": "assistant", "content": s.content or None,
                                   "reasoning_content": s.reasoning or None}
        if s.tool_calls:
            message["tool_calls"] = s.tool_calls
        return message

"""Incremental parser of DeepSeek-V4 completions into reasoning, content and tool-call events.

Feed it text deltas or token ids in any split. Once neighbouring deltas are merged
(`coalesce_events`), the events do not depend on where the chunks were cut. Text that may
still become a marker is held back until it is decided, so no partial marker reaches content,
reasoning or arguments. The tolerance rules for malformed output are listed in docs/chat.md.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import regex

from dsv4.chat import dsml_grammar as grammar
from dsv4.chat.arguments import ArgumentsBuilder, InvokeRejected
from dsv4.chat.events import (UNCLOSED_REASONING, ContentDelta, Event, MessageEnd, ParseError,
                              ParseWarning, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd,
                              ToolCallStart)
from dsv4.chat.messages import validate_tools
from dsv4.chat.tokenizer import IncrementalDetokenizer, Tokenizer, default_tokenizer
from dsv4.chat.tokens import THINK_END, THINK_START, TOOL_CALLS_OPEN

logger = logging.getLogger(__name__)

_WHITESPACE = " \t\r\n"


class StreamParser:
    """Parses one completion; create a new parser per request.

    `mode` is the mode the prompt was encoded in: "thinking" prompts end with ``<think>``, so
    output starts as reasoning. `tools` is the request's OpenAI tools list: a call to a name not
    in it becomes a `ParseError`. With ``tools=None`` names are not checked, and with ``[]``
    every call is an error.

    By default a call streams: `ToolCallStart` once its name is read, then argument deltas.
    A call rejected later ends in a `ParseError` with its index, so the consumer must drop it.
    With ``atomic_calls=True`` the start and deltas of a call are held and released together
    with its `ToolCallEnd`, and a rejected call shows only as a `ParseError`.
    """

    def __init__(self, mode: str = "thinking", tools: list[dict[str, Any]] | None = None, *,
                 tokenizer: Tokenizer | None = None, call_id_prefix: str | None = None,
                 atomic_calls: bool = False) -> None:
        if mode not in ("thinking", "chat"):
            raise ValueError(f"mode: invalid value {mode!r}; expected 'thinking' or 'chat'")
        self._schemas: dict[str, dict[str, Any]] | None = None
        if tools is not None:
            self._schemas = {f["name"]: f.get("parameters") or {}
                             for f in validate_tools(tools, "tools")}
        self._tokenizer = tokenizer
        self._detokenizer: IncrementalDetokenizer | None = None
        self._call_id_prefix = call_id_prefix if call_id_prefix is not None else secrets.token_hex(6)

        self._state = "reasoning" if mode == "thinking" else "content"
        self._buffer = ""            # text received but not consumed yet
        self._held_whitespace = ""   # trailing whitespace of reasoning/content, not yet emitted
        self._between_tags = ""      # text between tags inside the block, checked at the next tag
        self._wrapped = False        # the block opened with a tool_calls tag
        self._content_tail = ""      # end of the content so far, to find markers split by deltas
        self._think_markers_in_content: set[str] = set()
        self._trailing = ""          # text after the end-of-sentence marker
        self._calls_ended = 0
        self._next_index = 0
        self._finished = False
        # The invoke being parsed.
        self._recording = False      # consumed text is appended to _invoke_raw
        self._invoke_raw = ""
        self._invoke_index: int | None = None
        self._invoke_id = ""
        self._invoke_name = ""
        self._invoke_problem: str | None = None
        self._arguments: ArgumentsBuilder | None = None
        self._atomic_calls = atomic_calls
        self._held_call_events: list[Event] = []
        self._value_marked = True
        self._value_newline = ""     # a trailing newline of a value, dropped on implicit close

    # Public interface.

    def feed_text(self, delta: str) -> list[Event]:
        """Parse more completion text; return the events it completes."""
        if self._finished:
            raise ValueError("this StreamParser has finished; create a new one per completion")
        self._buffer += delta
        return self._drain(final=False)

    def feed_ids(self, ids: list[int]) -> list[Event]:
        """Parse more completion token ids, decoded with their marker tokens kept."""
        if self._detokenizer is None:
            self._tokenizer = self._tokenizer or default_tokenizer()
            self._detokenizer = self._tokenizer.detokenizer()
        return self.feed_text(self._detokenizer.feed(list(ids)))

    def finish(self, finish_reason: str = "stop") -> list[Event]:
        """End the stream: flush held text, close or reject open calls, emit `MessageEnd`.

        The finish reason becomes "tool_calls" when at least one call ended.
        """
        if self._finished:
            raise ValueError("finish() was already called on this StreamParser")
        if self._detokenizer is not None:
            self._buffer += self._detokenizer.flush()
        events = self._drain(final=True)
        events += self._end_of_stream()
        self._finished = True
        reason = "tool_calls" if self._calls_ended else finish_reason
        events.append(MessageEnd(reason))
        return events

    # Driving loop.

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        handlers = {"reasoning": self._step_text, "content": self._step_text,
                    "block": self._step_tags, "invoke": self._step_tags,
                    "value": self._step_value, "skip": self._step_skip,
                    "after_block": self._step_after_block, "done": self._step_done}
        while self._buffer:
            state, size = self._state, len(self._buffer)
            handlers[state](events, final)
            if self._state == state and len(self._buffer) == size:
                break  # waiting for more text
        return events

    def _take(self, count: int) -> str:
        """Consume `count` characters, recording them as raw text of the open invoke."""
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        if self._recording:
            self._invoke_raw += taken
        return taken

    # Reasoning and content.

    def _emit_text(self, events: list[Event], text: str, hold_whitespace: bool = True) -> None:
        text = self._held_whitespace + text
        self._held_whitespace = ""
        if hold_whitespace:
            stripped = text.rstrip(_WHITESPACE)
            self._held_whitespace = text[len(stripped):]
            text = stripped
        if not text:
            return
        if self._state == "reasoning":
            events.append(ReasoningDelta(text))
        else:
            window = self._content_tail + text
            self._think_markers_in_content.update(
                marker for marker in (THINK_START, THINK_END) if marker in window)
            self._content_tail = window[-len(THINK_END):]
            events.append(ContentDelta(text))

    def _step_text(self, events: list[Event], final: bool) -> None:
        pattern = grammar.REASONING_STOPS if self._state == "reasoning" else grammar.CONTENT_STOPS
        position, match = grammar.find_stop(pattern, self._buffer, final)
        self._emit_text(events, self._take(position))
        if match is None:
            if final:
                self._emit_text(events, "", hold_whitespace=False)
            return

        kind = match.lastgroup
        if kind == "stray":
            events.append(ParseError("DSML tag outside a tool-call block",
                                     self._take(match.end() - match.start())))
        elif kind == "think_end":
            self._take(match.end() - match.start())
            self._emit_text(events, "", hold_whitespace=False)
            self._state = "content"
        elif kind == "eos":
            self._take(match.end() - match.start())
            self._emit_text(events, "", hold_whitespace=False)
            if self._state == "reasoning":
                events.append(ParseWarning(UNCLOSED_REASONING))
            self._state = "done"
        else:
            # A tool-call block starts: one blank line before it belongs to the delimiter.
            held = self._held_whitespace
            self._held_whitespace = ""
            kept = held[:-2] if held.endswith("\n\n") else ""
            self._emit_text(events, kept, hold_whitespace=False)
            if self._state == "reasoning":
                events.append(ParseWarning("tool calls started before </think>; the reasoning "
                                           "was closed there"))
            self._wrapped = kind == "open_block"
            if self._wrapped:
                tag = self._take(match.end() - match.start())
                if tag != TOOL_CALLS_OPEN:
                    events.append(ParseWarning("accepted a malformed tool_calls opening tag", tag))
            else:
                events.append(ParseWarning("tool call without a tool_calls block around it"))
            self._state = "block"

    # Between tags of the block and of an invoke.

    def _flush_between(self, events: list[Event]) -> None:
        text, self._between_tags = self._between_tags, ""
        if not text.strip(_WHITESPACE):
            return
        if self._state == "invoke":
            self._invoke_problem = self._invoke_problem or f"unexpected text {text!r} in an invoke"
        else:
            events.append(ParseError("unexpected text in the tool-call block", text))

    def _step_tags(self, events: list[Event], final: bool) -> None:
        position, match = grammar.find_stop(grammar.BLOCK_TAGS, self._buffer, final)
        self._between_tags += self._take(position)
        if match is None:
            return
        self._flush_between(events)
        kind = match.lastgroup
        in_invoke = self._state == "invoke"
        if kind == "open_invoke":
            if in_invoke:
                self._end_invoke(events, closed=False)
            self._start_invoke(events, match)
        elif kind == "open_param" and in_invoke:
            self._take(match.end() - match.start())
            self._open_param(events, match)
        elif kind == "close_invoke" and in_invoke:
            self._take(match.end() - match.start())
            self._end_invoke(events, closed=True)
            self._state = "block"
        elif kind == "close_block":
            if in_invoke:
                self._end_invoke(events, closed=False)
            self._take(match.end() - match.start())
            self._state = "after_block"
        elif kind == "eos":
            self._take(match.end() - match.start())
            if in_invoke:
                self._reject_invoke(events, "the completion ended inside this invoke")
            elif self._wrapped:
                events.append(ParseWarning("the tool_calls block was not closed"))
            self._state = "done"
        else:
            # A tag that does not belong here, such as a parameter outside an invoke.
            self._between_tags += self._take(match.end() - match.start())

    def _start_invoke(self, events: list[Event], match: regex.Match[str]) -> None:
        self._clear_invoke()
        self._recording = True
        self._take(match.end() - match.start())
        self._state = "invoke"
        name = self._invoke_name = match.group("name")
        if not name.strip():
            self._invoke_problem = "the invoke has an empty name"
        elif self._schemas is not None and name not in self._schemas:
            self._invoke_problem = f"tool {name!r} is not declared in the request"
        if self._invoke_problem:
            self._state = "skip"
            return
        self._invoke_index = self._next_index
        self._next_index += 1
        self._invoke_id = f"call_{self._call_id_prefix}_{self._invoke_index}"
        schema = self._schemas.get(name) if self._schemas is not None else None
        self._arguments = ArgumentsBuilder(schema)
        self._call_events(events).append(ToolCallStart(self._invoke_index, self._invoke_id, name))

    def _open_param(self, events: list[Event], match: regex.Match[str]) -> None:
        assert self._arguments is not None
        try:
            deltas = self._arguments.open_param(match.group("key"), match.group("string"))
        except InvokeRejected as error:
            self._invoke_problem = str(error)
            self._state = "skip"
            return
        self._emit_arguments(events, deltas)
        self._value_marked = match.group("param_mark") is not None
        self._value_newline = ""
        self._state = "value"

    def _call_events(self, events: list[Event]) -> list[Event]:
        """Return where events of the open call go: the output, or the hold of an atomic call."""
        return self._held_call_events if self._atomic_calls else events

    def _emit_arguments(self, events: list[Event], deltas: list[str]) -> None:
        assert self._invoke_index is not None
        self._call_events(events).extend(
            ToolCallArgumentsDelta(self._invoke_index, d) for d in deltas if d)

    # Parameter values.

    def _step_value(self, events: list[Event], final: bool) -> None:
        assert self._arguments is not None
        pattern = grammar.VALUE_STOPS_MARKED if self._value_marked else grammar.VALUE_STOPS_ANY
        position, match = grammar.find_stop(pattern, self._buffer, final)

        # Hold one trailing newline back, because an implicitly closed value does not own it.
        text = self._value_newline + self._take(position)
        self._value_newline = "\n" if text.endswith("\n") else ""
        if self._value_newline:
            text = text[:-1]
        self._emit_arguments(events, self._arguments.add_value(text))
        if match is None:
            return

        kind = match.lastgroup
        held_newline, self._value_newline = self._value_newline, ""
        if kind == "eos":
            self._take(match.end() - match.start())
            self._reject_invoke(events, "the completion ended inside a parameter value")
            self._state = "done"
            return
        if kind == "close_param":
            self._emit_arguments(events, self._arguments.add_value(held_newline))
            self._take(match.end() - match.start())
        else:
            # The tag stays in the buffer for the invoke state to handle.
            events.append(ParseWarning("a parameter value was not closed; the next tag closed it",
                                       match.group()))

        try:
            self._emit_arguments(events, self._arguments.close_param())
        except InvokeRejected as error:
            self._invoke_problem = str(error)
            self._state = "skip"
            return
        self._state = "invoke"

    # Rejected invokes, the end of an invoke and the end of the stream.

    def _step_skip(self, events: list[Event], final: bool) -> None:
        position, match = grammar.find_stop(grammar.SKIP_STOPS, self._buffer, final)
        self._take(position)
        if match is None:
            return
        kind = match.lastgroup
        if kind == "open_invoke":
            self._reject_invoke(events, self._invoke_problem or "invalid invoke")
            self._state = "block"
            return
        self._take(match.end() - match.start())
        self._reject_invoke(events, self._invoke_problem or "invalid invoke")
        self._state = {"close_invoke": "block", "close_block": "after_block", "eos": "done"}[kind]

    def _reject_invoke(self, events: list[Event], reason: str) -> None:
        announced = self._invoke_index if not self._atomic_calls else None
        events.append(ParseError(f"invalid tool call: {reason}", self._invoke_raw, announced))
        logger.debug("rejected tool call %r: %s", self._invoke_name, reason)
        self._clear_invoke()

    def _clear_invoke(self) -> None:
        self._held_call_events = []
        self._recording = False
        self._invoke_raw = ""
        self._invoke_index = None
        self._invoke_name = ""
        self._invoke_problem = None
        self._arguments = None

    def _end_invoke(self, events: list[Event], closed: bool) -> None:
        if self._invoke_problem:
            self._reject_invoke(events, self._invoke_problem)
            return
        assert self._arguments is not None and self._invoke_index is not None
        if not closed:
            events.append(ParseWarning("an invoke was not closed; the next tag closed it",
                                       self._invoke_raw))
        try:
            deltas, arguments = self._arguments.finish()
        except InvokeRejected as error:
            self._reject_invoke(events, str(error))
            return
        self._emit_arguments(events, deltas)
        events += self._held_call_events
        events += [ParseWarning(message, raw) for message, raw in self._arguments.warnings]
        events.append(ToolCallEnd(self._invoke_index, self._invoke_id, self._invoke_name,
                                  arguments, json.loads(arguments)))
        self._calls_ended += 1
        self._clear_invoke()

    def _step_after_block(self, events: list[Event], final: bool) -> None:
        position, match = grammar.find_stop(grammar.CONTENT_STOPS, self._buffer, final)
        self._between_tags += self._take(position)
        if match is None:
            return
        if match.lastgroup == "eos":
            self._take(match.end() - match.start())
            self._report_after_block(events)
            self._state = "done"
        else:
            self._between_tags += self._take(match.end() - match.start())

    def _report_after_block(self, events: list[Event]) -> None:
        text, self._between_tags = self._between_tags, ""
        if text.strip(_WHITESPACE):
            events.append(ParseError("text after the tool-call block", text))

    def _step_done(self, events: list[Event], final: bool) -> None:
        self._trailing += self._take(len(self._buffer))

    def _end_of_stream(self) -> list[Event]:
        events: list[Event] = []
        if self._state in ("block", "invoke"):
            self._flush_between(events)
            if self._state == "invoke":
                self._reject_invoke(events, "the completion ended inside this invoke")
        elif self._state in ("value", "skip"):
            self._reject_invoke(events, self._invoke_problem
                                or "the completion ended inside a parameter value")
        if self._state == "after_block":
            self._report_after_block(events)
        if self._trailing.strip(_WHITESPACE):
            events.append(ParseWarning("text after the end-of-sentence marker was ignored",
                                       self._trailing))
        for marker in (THINK_START, THINK_END):
            if marker in self._think_markers_in_content:
                events.append(ParseWarning(f"content contains a literal {marker}; kept as text",
                                           marker))
        return events


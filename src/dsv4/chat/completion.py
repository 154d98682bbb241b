"""One-shot parsing of a whole completion into an assistant message."""

from __future__ import annotations

from typing import Any

from dsv4.chat.events import UNCLOSED_REASONING, ParsedMessage, ParseWarning
from dsv4.chat.stream_parser import StreamParser


def parse_completion(text: str, *, mode: str = "thinking",
                     tools: list[dict[str, Any]] | None = None, finish_reason: str = "stop",
                     unclosed_reasoning_as_content: bool = False,
                     call_id_prefix: str | None = None) -> ParsedMessage:
    """Parse a completion (text after the prompt, markers kept) into a `ParsedMessage`.

    In thinking mode a model sometimes replies without ever writing ``</think>``. By default
    that text stays reasoning, with a warning. `unclosed_reasoning_as_content` moves it to
    content instead when no ``</think>`` and no tool call was seen.
    """
    parser = StreamParser(mode=mode, tools=tools, call_id_prefix=call_id_prefix)
    events = parser.feed_text(text) + parser.finish(finish_reason)
    message = ParsedMessage.from_events(events)
    unclosed = any(w.message == UNCLOSED_REASONING for w in message.warnings)
    if unclosed_reasoning_as_content and unclosed and not message.tool_calls:
        message.content, message.reasoning_content = message.reasoning_content, ""
        message.warnings.append(ParseWarning("moved unclosed reasoning to content"))
    return message

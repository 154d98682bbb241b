"""Events the streaming parser emits, and the parsed assistant message they add up to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


UNCLOSED_REASONING = "the completion ended without </think>; its text was kept as reasoning"


@dataclass(frozen=True)
class ReasoningDelta:
    """More reasoning text (what the model wrote before ``</think>``)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """More visible content text (what the model wrote after ``</think>``)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call whose name is complete and declared; its arguments follow as deltas."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """More of the JSON arguments string of call `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """A finished call: `arguments` is the concatenation of its deltas, `parsed` its value."""

    index: int
    id: str
    name: str
    arguments: str
    parsed: dict[str, Any]


@dataclass(frozen=True)
class ParseError:
    """Model output that could not become a call or text; `raw` keeps it unchanged.

    `index` is set when the call had already been announced by a `ToolCallStart`, which the
    consumer must then discard.
    """

    message: str
    raw: str
    index: int | None = None


@dataclass(frozen=True)
class ParseWarning:
    """Output accepted through a tolerance rule (see docs/chat.md); `raw` is the text involved."""

    message: str
    raw: str = ""


@dataclass(frozen=True)
class MessageEnd:
    """End of the message; `finish_reason` is "tool_calls" exactly when a call ended."""

    finish_reason: str


Event = (ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgumentsDelta | ToolCallEnd
         | ParseError | ParseWarning | MessageEnd)


def coalesce_events(events: list[Event]) -> list[Event]:
    """Merge neighbouring deltas of the same kind (and call), so two feedings compare equal."""
    merged: list[Event] = []
    for event in events:
        previous = merged[-1] if merged else None
        if isinstance(event, ReasoningDelta | ContentDelta) and type(previous) is type(event):
            merged[-1] = type(event)(previous.text + event.text)
        elif (isinstance(event, ToolCallArgumentsDelta)
              and isinstance(previous, ToolCallArgumentsDelta)
              and previous.index == event.index):
            merged[-1] = ToolCallArgumentsDelta(event.index, previous.text + event.text)
        else:
            merged.append(event)
    return merged


@dataclass
class ParsedMessage:
    """An assistant message assembled from parser events, with tool calls in OpenAI shape."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)
    warnings: list[ParseWarning] = field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def from_events(cls, events: list[Event]) -> ParsedMessage:
        """Fold a complete event list into one message."""
        message = cls()
        for event in events:
            if isinstance(event, ReasoningDelta):
                message.reasoning_content += event.text
            elif isinstance(event, ContentDelta):
                message.content += event.text
            elif isinstance(event, ToolCallEnd):
                message.tool_calls.append({
                    "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": event.arguments}})
            elif isinstance(event, ParseError):
                message.errors.append(event)
            elif isinstance(event, ParseWarning):
                message.warnings.append(event)
            elif isinstance(event, MessageEnd):
                message.finish_reason = event.finish_reason
        return message

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: the OpenAI assistant message plus errors and warnings."""
        return {
            "role": "assistant",
            "reasoning_content": self.reasoning_content,
            "content": self.content,
            "tool_calls": self.tool_calls,
            "finish_reason": self.finish_reason,
            "errors": [asdict(e) for e in self.errors],
            "warnings": [asdict(w) for w in self.warnings],
        }

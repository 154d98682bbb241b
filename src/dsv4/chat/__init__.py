"""The DeepSeek-V4 chat format: tokenizer, prompt encoder and streaming completion parser."""

from dsv4.chat.completion import parse_completion
from dsv4.chat.encoder import EncodedPrompt, encode_messages
from dsv4.chat.errors import ChatFormatError
from dsv4.chat.events import (ContentDelta, Event, MessageEnd, ParsedMessage, ParseError,
                              ParseWarning, ReasoningDelta, ToolCallArgumentsDelta, ToolCallEnd,
                              ToolCallStart, coalesce_events)
from dsv4.chat.stream_parser import StreamParser
from dsv4.chat.tokenizer import IncrementalDetokenizer, Tokenizer, default_tokenizer

__all__ = [
    "ChatFormatError",
    "ContentDelta",
    "EncodedPrompt",
    "Event",
    "IncrementalDetokenizer",
    "MessageEnd",
    "ParseError",
    "ParseWarning",
    "ParsedMessage",
    "ReasoningDelta",
    "StreamParser",
    "Tokenizer",
    "ToolCallArgumentsDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "coalesce_events",
    "default_tokenizer",
    "encode_messages",
    "parse_completion",
]

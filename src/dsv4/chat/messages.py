"""Validation of OpenAI-style chat messages and their conversion into V4 turns.

V4 has no tool role on the wire: tool results join the user turn that follows the call, in
the order of the calls. The functions here produce the list of turns the renderer walks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dsv4.chat.errors import ChatFormatError
from dsv4.chat.tokens import ASSISTANT_TASKS, USER_TASKS

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


@dataclass
class HistoryToolCall:
    """A tool call of an assistant message in the conversation history."""

    id: str | None
    name: str
    arguments: dict[str, Any]


@dataclass
class Block:
    """One part of a user turn: a text, or a tool result (``kind == "tool_result"``)."""

    kind: str
    text: str
    call_id: str | None = None


@dataclass
class Turn:
    """A message after validation, ready to render."""

    role: str
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[HistoryToolCall] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    response_format: Any = None
    task: str | None = None
    without_eos: bool = False
    blocks: list[Block] = field(default_factory=list)


def content_text(content: Any, where: str) -> str:
    """Flatten message content (None, a string or a list of parts) into one string.

    Text parts are joined with a blank line; other parts become ``[Unsupported <type>]``, as the
    text-only V4 encoder renders them.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(
            f"{where}: content must be a string, a list of parts or null, "
            f"got {type(content).__name__}")
    pieces = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            pieces.append(str(part.get("text", "")))
        elif isinstance(part, dict):
            pieces.append(f"[Unsupported {part.get('type')}]")
        else:
            raise ChatFormatError(f"{where}: content[{j}] must be an object, got {part!r}")
    return "\n\n".join(pieces)


def validate_tools(tools: Any, where: str) -> list[dict[str, Any]]:
    """Check an OpenAI tools list and return the ``function`` object of each tool."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"{where}: tools must be a list, got {type(tools).__name__}")
    functions = []
    for j, tool in enumerate(tools):
        at = f"{where}[{j}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise ChatFormatError(
                f'{at}: a tool must be {{"type": "function", "function": {{"name": ...}}}}, '
                f"got {tool!r}")
        if tool.get("type", "function") != "function":
            raise ChatFormatError(f"{at}.type: only 'function' tools are supported, got "
                                  f"{tool.get('type')!r}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name or '"' in name or "<" in name:
            raise ChatFormatError(
                f"{at}.function.name: invalid tool name {name!r}; use a non-empty name "
                f'without quotes or "<"')
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise ChatFormatError(
                f"{at}.function.parameters: must be a JSON Schema object, got "
                f"{function['parameters']!r}")
        functions.append(function)
    return functions


def _tool_calls(raw: Any, where: str) -> list[HistoryToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list, got {type(raw).__name__}")
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f"{at}: expected {{\"function\": {{\"name\", \"arguments\"}}}}, "
                                  f"got {call!r}")
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise ChatFormatError(
                    f"{at}.function.arguments: invalid JSON ({error}); pass a JSON object "
                    f"string such as '{{\"city\": \"Paris\"}}'") from None
        if not isinstance(arguments, dict):
            raise ChatFormatError(
                f"{at}.function.arguments: must be a JSON object, got {arguments!r}")
        calls.append(HistoryToolCall(call.get("id"), function["name"], arguments))
    return calls


def validate_messages(messages: Any) -> list[Turn]:
    """Check each message and convert it to a `Turn`; raise ChatFormatError on the first problem."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"messages: expected a list of messages, got {type(messages).__name__}")
    turns: list[Turn] = []
    known_call_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatFormatError(f"{where}: expected an object with a role, got {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(
                f"{where}.role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        turn = Turn(role=role, content=content_text(message.get("content"), where))

        if message.get("tools") is not None:
            if role not in ("system", "developer"):
                raise ChatFormatError(f"{where}.tools: tools belong on a system or developer "
                                      f"message, not on role {role!r}")
            turn.tools = validate_tools(message["tools"], f"{where}.tools") or None
        if message.get("response_format") is not None:
            if role not in ("system", "developer"):
                raise ChatFormatError(f"{where}.response_format: belongs on a system or "
                                      f"developer message, not on role {role!r}")
            turn.response_format = message["response_format"]

        task = message.get("task")
        if task is not None:
            allowed = ASSISTANT_TASKS if role == "assistant" else USER_TASKS
            if role not in ("user", "assistant") or task not in allowed:
                raise ChatFormatError(
                    f"{where}.task: invalid task {task!r} on role {role!r}; user messages "
                    f"take {', '.join(USER_TASKS)} and assistant messages take "
                    f"{', '.join(ASSISTANT_TASKS)}")
            turn.task = task

        if role == "developer" and not turn.content:
            raise ChatFormatError(f"{where}.content: a developer message needs non-empty content")
        if role == "assistant":
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatFormatError(f"{where}.reasoning_content: must be a string, "
                                      f"got {type(reasoning).__name__}")
            turn.reasoning = reasoning
            turn.tool_calls = _tool_calls(message.get("tool_calls"), f"{where}.tool_calls")
            known_call_ids.update(c.id for c in turn.tool_calls if c.id)
            turn.without_eos = bool(message.get("prefix") or message.get("wo_eos"))
            if turn.without_eos and i != len(messages) - 1:
                raise ChatFormatError(
                    f"{where}.prefix: only the last message can be a prefix to continue "
                    f"(found at index {i} of {len(messages)})")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and call_id not in known_call_ids:
                raise ChatFormatError(
                    f"{where}.tool_call_id: {call_id!r} matches no tool call of an earlier "
                    f"assistant message; use the id of the call this result answers")
            turn.blocks = [Block("tool_result", turn.content, call_id)]
        elif role == "user":
            turn.blocks = [Block("text", turn.content)]
        turns.append(turn)
    return turns


def merge_tool_results(turns: list[Turn]) -> list[Turn]:
    """Fold tool turns and directly following user turns into one user turn each.

    A user turn that carries a quick-instruction task is never extended.
    """
    merged: list[Turn] = []
    for turn in turns:
        previous = merged[-1] if merged else None
        joinable = previous is not None and previous.role == "user" and previous.task is None
        if turn.role in ("tool", "user") and joinable:
            previous.blocks.extend(turn.blocks)
            previous.task = turn.task
            continue
        if turn.role == "tool":
            turn = Turn(role="user", blocks=list(turn.blocks))
        merged.append(turn)
    _sort_results_by_call_order(merged)
    return merged


def _sort_results_by_call_order(turns: list[Turn]) -> None:
    """Reorder the tool results of each user turn into the order of their calls.

    The order comes from the latest assistant turn with calls. Results whose id matches none
    of its calls sort first, the sort is stable, and text blocks keep their places.
    """
    call_order: dict[str, int] = {}
    for turn in turns:
        if turn.role == "assistant" and turn.tool_calls:
            call_order = {c.id: k for k, c in enumerate(turn.tool_calls) if c.id}
        if turn.role != "user":
            continue
        slots = [k for k, b in enumerate(turn.blocks) if b.kind == "tool_result"]
        if len(slots) < 2:
            continue
        results = sorted((turn.blocks[k] for k in slots),
                         key=lambda b: call_order.get(b.call_id, 0))
        for k, block in zip(slots, results):
            turn.blocks[k] = block

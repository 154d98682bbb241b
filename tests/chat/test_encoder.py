"""Encoder behaviour beyond the golden vectors: efforts, tool choice, reasoning history, errors."""

import pytest

from support.chat_helpers import tool
from dsv4.chat import ChatFormatError, encode_messages
from dsv4.chat.templates import EFFORT_ABSOLUTE_MAXIMUM, EFFORT_BEYOND_MAXIMUM

BOS = "<｜begin▁of▁sentence｜>"
USER_TEST = [{"role": "user", "content": "test"}]


def encode(messages, tools=None, **options):
    return encode_messages(messages, tools, **options).text


@pytest.mark.parametrize("family, effort, prefix", [
    ("v4", None, ""),
    ("v4", "high", ""),
    ("v4", "max", EFFORT_ABSOLUTE_MAXIMUM),
    ("v4-0731", None, ""),
    ("v4-0731", "low", ""),
    ("v4-0731", "high", EFFORT_ABSOLUTE_MAXIMUM),
    ("v4-0731", "max", EFFORT_BEYOND_MAXIMUM),
])
def test_effort_prefix_by_family(family, effort, prefix):
    text = encode(USER_TEST, reasoning_effort=effort, family=family)
    assert text == f"{BOS}{prefix}<｜User｜>test<｜Assistant｜><think>"


def test_effort_texts_exact():
    assert EFFORT_ABSOLUTE_MAXIMUM.startswith(
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert EFFORT_BEYOND_MAXIMUM.startswith("Reasoning Effort: Beyond maximum \u2014 exhaustive")
    assert EFFORT_ABSOLUTE_MAXIMUM.endswith("unchecked.\n\n")
    assert EFFORT_BEYOND_MAXIMUM.endswith("undiscovered.\n\n")
    assert EFFORT_ABSOLUTE_MAXIMUM.count("\n") == 4
    assert EFFORT_BEYOND_MAXIMUM.count("\n") == 4


def test_effort_ignored_in_chat_mode():
    text = encode(USER_TEST, mode="chat", reasoning_effort="max")
    assert text == f"{BOS}<｜User｜>test<｜Assistant｜></think>"


def test_effort_prefix_only_at_start():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    text = encode(messages, reasoning_effort="max")
    assert text.startswith(BOS + EFFORT_ABSOLUTE_MAXIMUM + "S<｜User｜>a")
    assert text.count("Reasoning Effort") == 1


def test_effort_aliases():
    assert encode(USER_TEST, reasoning_effort="xhigh") == encode(USER_TEST, reasoning_effort="max")
    assert encode(USER_TEST, reasoning_effort="medium", family="v4-0731") == encode(
        USER_TEST, reasoning_effort="high", family="v4-0731")


def test_invalid_effort_and_family():
    with pytest.raises(ChatFormatError, match="reasoning_effort.*'extreme'"):
        encode(USER_TEST, reasoning_effort="extreme")
    with pytest.raises(ChatFormatError, match="family.*'v5'"):
        encode(USER_TEST, family="v5")


def test_non_thinking_single_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode(messages, mode="chat") == f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜></think>"


def test_tool_choice_none_leaves_tools_out():
    bash = tool("Bash", command="string")
    messages = [{"role": "user", "content": "print working dir"}]
    text = encode(messages, [bash], tool_choice="none")
    assert "## Tools" not in text
    assert text == f"{BOS}<｜User｜>print working dir<｜Assistant｜><think>"
    assert "## Tools" in encode(messages, [bash], tool_choice="auto")


def test_tool_choice_none_drops_message_tools():
    messages = [{"role": "system", "content": "S", "tools": [tool("f")]},
                {"role": "user", "content": "x"}]
    assert encode(messages, tool_choice="none") == f"{BOS}S<｜User｜>x<｜Assistant｜><think>"


def test_forced_tool_choice_in_thinking_rejected():
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatFormatError, match="thinking mode"):
        encode(messages, [tool("f")], tool_choice="required")
    with pytest.raises(ChatFormatError, match="thinking mode"):
        encode(messages, [tool("f")], tool_choice={"type": "function", "function": {"name": "f"}})
    assert "## Tools" in encode(messages, [tool("f")], tool_choice="required", mode="chat")


def test_tools_without_system_message():
    text = encode([{"role": "user", "content": "x"}], [tool("f")])
    assert text.startswith(BOS + "\n\n## Tools\n\n")
    assert text.endswith("to invoke tool calls.\n<｜User｜>x<｜Assistant｜><think>")


def test_missing_reasoning_renders_empty_think():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "b"}]
    text = encode(messages, [tool("f")])
    assert "<｜User｜>a<｜Assistant｜><think></think>hi<｜end▁of▁sentence｜><｜User｜>b" in text


def test_tools_keep_earlier_reasoning():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
                {"role": "user", "content": "b"}]
    with_tools = encode(messages, [tool("f")])
    assert "<｜Assistant｜><think>R1</think>A1<｜end▁of▁sentence｜>" in with_tools
    without = encode(messages)
    assert "R1" not in without
    assert "<｜Assistant｜></think>A1<｜end▁of▁sentence｜>" in without
    kept = encode(messages, drop_thinking=False)
    assert "<think>R1</think>A1" in kept


def test_reasoning_field_alias():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "reasoning": "R", "content": "A"}]
    assert encode(messages).endswith("<think>R</think>A<｜end▁of▁sentence｜>")


def test_developer_dropped_from_history():
    messages = [{"role": "developer", "content": "old task"},
                {"role": "assistant", "reasoning_content": "r", "content": "done"},
                {"role": "user", "content": "next"}]
    text = encode(messages)
    assert "old task" not in text
    assert text == f"{BOS}done<｜end▁of▁sentence｜><｜User｜>next<｜Assistant｜><think>"


def test_tool_results_merged_in_call_order():
    calls = [{"id": i, "type": "function", "function": {"name": "t", "arguments": "{}"}}
             for i in ("a", "b", "c")]
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c", "content": "C"},
                {"role": "tool", "tool_call_id": "a", "content": "A"},
                {"role": "tool", "tool_call_id": "b", "content": "B"},
                {"role": "user", "content": "and?"}]
    text = encode(messages, [tool("t")])
    assert text.endswith("<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>"
                         "\n\n<tool_result>C</tool_result>\n\nand?<｜Assistant｜><think>")


def test_tool_result_parts_flattened():
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                      "function": {"name": "t", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a",
                 "content": [{"type": "text", "text": "x"}, {"type": "image_url"}]}]
    assert "<tool_result>x\n\n[Unsupported image_url]</tool_result>" in encode(messages, [tool("t")])


def test_dsml_rendering_of_typed_arguments():
    arguments = '{"s": "l1\\nl2 <b>\\"q\\"</b>", "n": 3, "t": true, "z": null, "o": {"x": []}}'
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "Calling.",
                 "tool_calls": [{"id": "a", "type": "function",
                                 "function": {"name": "f", "arguments": arguments}}]}]
    text = encode(messages, mode="chat")
    D = "｜DSML｜"
    assert text.endswith(
        f'Calling.\n\n<{D}tool_calls>\n<{D}invoke name="f">\n'
        f'<{D}parameter name="s" string="true">l1\nl2 <b>"q"</b></{D}parameter>\n'
        f'<{D}parameter name="n" string="false">3</{D}parameter>\n'
        f'<{D}parameter name="t" string="false">true</{D}parameter>\n'
        f'<{D}parameter name="z" string="false">null</{D}parameter>\n'
        f'<{D}parameter name="o" string="false">{{"x": []}}</{D}parameter>\n'
        f"</{D}invoke>\n</{D}tool_calls><｜end▁of▁sentence｜>")


def test_response_format_block():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}]
    text = encode(messages, response_format={"type": "json_object"}, mode="chat")
    assert text == (f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
                    f'schema to reply:\n{{"type": "json_object"}}<｜User｜>x<｜Assistant｜></think>')


def test_prefix_completion_flag():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hel", "prefix": True}]
    assert encode(messages, mode="chat") == f"{BOS}<｜User｜>Hi<｜Assistant｜></think>Hel"
    assert encode(messages) == f"{BOS}<｜User｜>Hi<｜Assistant｜><think></think>Hel"


def test_without_generation_prompt():
    assert encode(USER_TEST, add_generation_prompt=False) == f"{BOS}<｜User｜>test"


def test_latest_reminder():
    messages = [{"role": "system", "content": "S"},
                {"role": "latest_reminder", "content": "2026-02-21,Oslo"},
                {"role": "user", "content": "x"}]
    assert encode(messages, mode="chat") == (
        f"{BOS}S<｜latest_reminder｜>2026-02-21,Oslo<｜User｜>x<｜Assistant｜></think>")


@pytest.mark.parametrize("task, tail", [
    ("query", "<｜User｜>best laptops<｜query｜>"),
    ("authority", "<｜User｜>best laptops<｜authority｜>"),
    ("domain", "<｜User｜>best laptops<｜domain｜>"),
    ("read_url", "<｜User｜>best laptops<｜read_url｜>"),
    ("action", "<｜User｜>best laptops<｜Assistant｜><think><｜action｜>"),
])
def test_user_tasks(task, tail):
    text = encode([{"role": "user", "content": "best laptops", "task": task}])
    assert text == BOS + tail


def test_title_task():
    messages = [{"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!", "task": "title"},
                {"role": "assistant", "content": "Greeting"}]
    text = encode(messages, [tool("f")], tool_choice="none", drop_thinking=False)
    assert text.endswith("<｜User｜>Hello<｜Assistant｜><think></think>Hi!<｜end▁of▁sentence｜>"
                         "<｜title｜>Greeting<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role: unknown role 'wizard'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
     r"messages\[1\]\.tool_call_id: 'nope' matches no tool call"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments: invalid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     r"must be a JSON object"),
    ([{"role": "user", "content": "x", "task": "summarize"}], r"messages\[0\]\.task: invalid task"),
    ([{"role": "developer", "content": ""}], r"messages\[0\]\.content: a developer message"),
    ([{"role": "user", "content": "x", "tools": []}], r"messages\[0\]\.tools: tools belong"),
    ([{"role": "assistant", "content": "a", "prefix": True}, {"role": "user", "content": "x"}],
     r"messages\[0\]\.prefix: only the last message"),
    ([{"role": "user", "content": 5}], r"messages\[0\]: content must be"),
    ("hello", r"messages: expected a list"),
])
def test_invalid_messages(messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        encode(messages)


@pytest.mark.parametrize("tools, pattern", [
    ([{"type": "function"}], r"tools\[0\]: a tool must be"),
    ([{"type": "retrieval", "function": {"name": "f"}}], r"tools\[0\]\.type"),
    ([{"type": "function", "function": {"name": ""}}], r"tools\[0\]\.function\.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], r"parameters"),
    ({"f": 1}, r"tools: tools must be a list"),
])
def test_invalid_tools(tools, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        encode(USER_TEST, tools)


def test_chat_format_error_is_value_error():
    assert issubclass(ChatFormatError, ValueError)


def test_tool_choice_none_keeps_reasoning():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
                {"role": "user", "content": "b"}]
    text = encode(messages, [tool("f")], tool_choice="none")
    assert "## Tools" not in text
    assert text == (f"{BOS}<｜User｜>a<｜Assistant｜><think>R1</think>A1<｜end▁of▁sentence｜>"
                    "<｜User｜>b<｜Assistant｜><think>")


def test_input_messages_not_modified():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}]
    snapshot = [dict(m) for m in messages]
    encode(messages, [tool("f")], response_format={"type": "json_object"})
    assert messages == snapshot

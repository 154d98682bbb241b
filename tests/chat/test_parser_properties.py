"""Property tests: encode->parse round trips, and chunking never changes the parse."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.chat_helpers import DSML, EOS, assert_split_invariant, run_parser, tool
from dsv4.chat import ParsedMessage, encode_messages, parse_completion

# No letters that could spell a marker word (think, invoke, parameter, DSML), and no bars.
ALPHABET = "abcxyz ABC019<>/=\"'\n\t{}[]:,.\\&é中😀"
TEXT = st.text(alphabet=ALPHABET, max_size=30)
KEYS = st.text(alphabet="abcxyz_", min_size=1, max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6)
TOOL_NAMES = ["get_weather", "run.shell", "x"]
TOOLS = [tool(name) for name in TOOL_NAMES]
CALLS = st.lists(st.tuples(st.sampled_from(TOOL_NAMES),
                           st.dictionaries(KEYS, JSON_VALUES, max_size=4)), max_size=3)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def assistant_message(reasoning, content, calls):
    message = {"role": "assistant", "reasoning_content": reasoning, "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"c{k}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}
            for k, (name, arguments) in enumerate(calls)]
    return message


@SETTINGS
@given(reasoning=TEXT, content=TEXT, calls=CALLS, mode=st.sampled_from(["thinking", "chat"]))
def test_encode_parse_round_trip(reasoning, content, calls, mode):
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    prompt = encode_messages(conversation, TOOLS, mode=mode).text
    full = encode_messages(conversation + [assistant_message(reasoning, content, calls)],
                           TOOLS, mode=mode).text
    assert full.startswith(prompt)
    completion = full[len(prompt):]

    message = parse_completion(completion, mode=mode, tools=TOOLS)
    assert message.errors == []
    assert message.warnings == []
    assert message.content == content
    assert message.reasoning_content == (reasoning if mode == "thinking" else "")
    assert [c["function"]["name"] for c in message.tool_calls] == [name for name, _ in calls]
    assert [json.loads(c["function"]["arguments"]) for c in message.tool_calls] == [
        arguments for _, arguments in calls]
    assert message.finish_reason == ("tool_calls" if calls else "stop")


FRAGMENTS = [
    "</think>", "<think>", f"<{DSML}tool_calls>", f"</{DSML}tool_calls>",
    f'<{DSML}invoke name="x">', f'<{DSML}invoke name="nope">', f"</{DSML}invoke>",
    f'<{DSML}parameter name="a" string="true">', f'<{DSML}parameter name="b" string="false">',
    f'<{DSML}parameter name="c" string="bad">', f"</{DSML}parameter>", '<invoke name="x">',
    '<parameter name="a" string="true">', "</parameter>", "<｜DSML｜function_calls>",
    "< | DSML | tool_calls>", EOS, "\n", "\n\n", "<", "</", "｜", "DSML", "2>&1", "[1, 2]",
    '{"k": ', "}", "中文", "😀",
]
COMPLETIONS = st.lists(st.sampled_from(FRAGMENTS) | TEXT, max_size=12).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=COMPLETIONS, mode=st.sampled_from(["thinking", "chat"]))
def test_any_split_gives_same_events(tokenizer, text, mode):
    events = assert_split_invariant(text, mode=mode, tools=TOOLS, tokenizer=tokenizer)
    message = ParsedMessage.from_events(events)
    for field in (message.content, message.reasoning_content):
        assert f"<{DSML}" not in field
        assert f"</{DSML}" not in field
        assert EOS not in field
    assert (message.finish_reason == "tool_calls") == bool(message.tool_calls)


@SETTINGS
@given(reasoning=TEXT, content=TEXT, calls=CALLS)
def test_round_trip_split_anywhere(reasoning, content, calls):
    conversation = [{"role": "user", "content": "q"}]
    prompt = encode_messages(conversation, TOOLS).text
    full = encode_messages(conversation + [assistant_message(reasoning, content, calls)],
                           TOOLS).text
    completion = full[len(prompt):]
    whole = run_parser([completion], "thinking", TOOLS)
    cut = len(completion) // 2
    for split in ([completion[:cut], completion[cut:]], list(completion)):
        assert run_parser(split, "thinking", TOOLS) == whole


MARKER_TEXT = st.lists(st.sampled_from(["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
                                        EOS, "<｜begin▁of▁sentence｜>", f"<{DSML}tool_calls>",
                                        "<dsml:", "<|EOT|>"]) | TEXT, max_size=8).map("".join)


@settings(max_examples=40, deadline=None)
@given(user_text=MARKER_TEXT, reply=MARKER_TEXT)
def test_pasted_markers_stay_text(tokenizer, user_text, reply):
    messages = [{"role": "user", "content": user_text},
                {"role": "assistant", "content": reply}, {"role": "user", "content": "next"}]
    prompt = encode_messages(messages, mode="chat", tokenizer=tokenizer)
    assert tokenizer.decode(prompt.token_ids) == prompt.text
    assert prompt.token_ids.count(0) == 1           # BOS
    assert prompt.token_ids.count(1) == 1           # the assistant turn's EOS
    assert prompt.token_ids.count(128803) == 2      # two user turns
    assert prompt.token_ids.count(128804) == 2      # two assistant markers
    assert prompt.token_ids.count(128822) == 2      # </think> after each assistant marker
    assert 128821 not in prompt.token_ids
    assert 128825 not in prompt.token_ids
    assert 128840 not in prompt.token_ids           # <dsml:
    assert 128805 not in prompt.token_ids           # <|EOT|>

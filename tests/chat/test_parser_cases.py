"""Parser behaviour on the malformed and split outputs reported against V3.2/V4 deployments."""

import json

import pytest

from support.chat_helpers import DSML, EOS, assert_split_invariant, dsml, run_parser, tool
from dsv4.chat import (ContentDelta, MessageEnd, ParsedMessage, ParseError, ParseWarning,
                       StreamParser, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart,
                       parse_completion)

F_TOOLS = [tool("f", a="string", b="integer")]


def parsed(events) -> ParsedMessage:
    return ParsedMessage.from_events(events)


def arguments(message: ParsedMessage) -> list:
    return [json.loads(c["function"]["arguments"]) for c in message.tool_calls]


def names(message: ParsedMessage) -> list:
    return [c["function"]["name"] for c in message.tool_calls]


def assert_no_dsml_leak(message: ParsedMessage) -> None:
    for text in (message.content, message.reasoning_content):
        assert "DSML" not in text
        assert "<invoke" not in text
        assert "<parameter" not in text
        assert EOS not in text


# Streaming and chunk boundaries.

def test_marker_split_across_chunks(tokenizer):
    chunks = ["Sure.⏎⏎<｜DS", "ML｜tool_", "calls>⏎<D invoke name=\"f\">⏎<D parameter name=\"a\" "
              "string=\"true\">x</D parameter>⏎</D invoke>⏎</D tool_calls>", EOS]
    chunks = [dsml(c) for c in chunks]
    message = parsed(run_parser(chunks, tools=F_TOOLS))
    assert message.content == "Sure."
    assert names(message) == ["f"]
    assert arguments(message) == [{"a": "x"}]
    assert message.finish_reason == "tool_calls"
    assert_no_dsml_leak(message)
    events = assert_split_invariant("".join(chunks), tools=F_TOOLS, tokenizer=tokenizer)
    assert parsed(events) == message


def test_parser_is_single_use():
    parser = StreamParser(mode="chat")
    parser.feed_text("hi")
    parser.finish()
    with pytest.raises(ValueError, match="create a new one"):
        parser.feed_text("more")
    fresh = run_parser(["hi" + EOS])
    assert parsed(fresh).content == "hi"


def test_partial_closing_tag_not_in_arguments(tokenizer):
    chunks = [dsml('<D tool_calls>⏎<D invoke name="w">⏎<D parameter name="city" string="true">'
                   'Paris</｜DSM'), dsml("L｜parameter>⏎</D invoke>⏎</D tool_calls>") + EOS]
    parser = StreamParser(mode="chat", call_id_prefix="t")
    events = parser.feed_text(chunks[0]) + parser.feed_text(chunks[1]) + parser.finish()
    deltas = [e.text for e in events if isinstance(e, ToolCallArgumentsDelta)]
    assert "".join(deltas) == '{"city": "Paris"}'
    assert all("<" not in d for d in deltas)
    assert_split_invariant("".join(chunks), tokenizer=tokenizer)


def test_value_with_angle_brackets_survives():
    text = dsml('<D tool_calls>⏎<D invoke name="sh">⏎<D parameter name="cmd" string="true">'
                'a<b && ls 2>&1 </b> </parameter></D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text))
    assert arguments(message) == [{"cmd": "a<b && ls 2>&1 </b> </parameter>"}]


def test_held_text_flushed_at_end():
    assert parsed(run_parser(["Is 2 <", EOS])).content == "Is 2 <"
    assert parsed(run_parser(["Is 2 <"])).content == "Is 2 <"
    assert parsed(run_parser(["tail <｜DS"])).content == "tail <｜DS"


def test_lone_arguments_parameter_unwrapped():
    text = dsml('<D tool_calls>⏎<D invoke name="w">⏎<D parameter name="arguments" string="false">'
                '{"city": "Rome"}</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=[tool("w", city="string")]))
    assert arguments(message) == [{"city": "Rome"}]
    assert any("unwrapped" in w.message for w in message.warnings)


def test_real_arguments_field_kept():
    text = dsml('<D tool_calls>⏎<D invoke name="w">⏎<D parameter name="arguments" string="true">'
                '{"city": "Rome"}</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(run_parser([text], tools=[tool("w", arguments="string")]))
    assert arguments(message) == [{"arguments": '{"city": "Rome"}'}]
    assert message.warnings == []


def test_string_attribute_decides_type():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">5'
                '</D parameter>⏎<D parameter name="b" string="false">5</D parameter>⏎'
                '</D invoke>⏎</D tool_calls>') + EOS
    assert arguments(parsed(run_parser([text]))) == [{"a": "5", "b": 5}]


def test_fused_newlines_token_level(tokenizer):
    block = dsml('⏎<D invoke name="f">⏎<D parameter name="a" string="true">1</D parameter>⏎'
                 '</D invoke>⏎</D tool_calls>') + EOS
    ids = [68520, 339, 30, 128825, 72461, 4941, 12548, 32] + tokenizer.encode_with_markers(block)
    parser = StreamParser(mode="chat", tokenizer=tokenizer, call_id_prefix="t")
    events = []
    for token_id in ids:
        events += parser.feed_ids([token_id])
    message = parsed(events + parser.finish())
    assert message.content == "Done."
    assert arguments(message) == [{"a": "1"}]


# Malformed or variant DSML.

def test_wrapper_without_underscore():
    text = dsml('<D toolcalls>⏎<D invoke name="get_weather">⏎<D parameter name="city" '
                'string="true">Seoul</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=[tool("get_weather", city="string")]))
    assert arguments(message) == [{"city": "Seoul"}]
    assert message.content == ""
    assert any("malformed tool_calls" in w.message for w in message.warnings)


def test_bare_invoke_without_wrapper():
    text = dsml('<D invoke name="f">⏎<D parameter name="a" string="true">1</D parameter>⏎'
                '</D invoke>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{"a": "1"}]
    assert message.content == ""


def test_unterminated_block():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">1'
                '</D parameter>⏎</D invoke>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{"a": "1"}]
    assert any("not closed" in w.message for w in message.warnings)


def test_broken_sibling_reported():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">1'
                '</D parameter>⏎</D invoke>⏎<D invoke name="f">⏎<D parameter name="b" '
                'string="maybe">5</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{"a": "1"}]
    assert len(message.errors) == 1
    assert 'string="maybe"' in message.errors[0].raw
    assert message.finish_reason == "tool_calls"


def test_v32_block_name():
    text = dsml('<D function_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">1'
                '</D parameter>⏎</D invoke>⏎</D function_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{"a": "1"}]
    assert message.errors == []


@pytest.mark.parametrize("opener", ["< | DSML | tool_calls>", "<||DSML||tool_calls>",
                                    "<|DSML|tool_calls>"])
def test_bar_and_space_variants(opener):
    text = opener + dsml('⏎<D invoke name="f">⏎<D parameter name="a" string="true">1'
                         '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(run_parser(["Ok.\n\n" + text], tools=F_TOOLS))
    assert message.content == "Ok."
    assert arguments(message) == [{"a": "1"}]


def test_missing_parameter_closer():
    text = dsml('<D invoke name="f">⏎<D parameter name="a" string="true">x⏎<D parameter name="b" '
                'string="false">2</D parameter>⏎</D invoke>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{"a": "x", "b": 2}]
    assert any("not closed" in w.message for w in message.warnings)


def test_markerless_parameter_repaired_from_schema():
    text = dsml("I'll enable it.⏎⏎<D tool_calls>⏎<D invoke name=\"set_flag\">⏎<parameter "
                'name="enabled">true</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=[tool("set_flag", enabled="boolean")]))
    assert message.content == "I'll enable it."
    assert arguments(message) == [{"enabled": True}]
    assert any("missing string attribute" in w.message for w in message.warnings)


def test_markerless_parameter_without_schema_rejected():
    text = dsml("I'll enable it.⏎⏎<D tool_calls>⏎<D invoke name=\"set_flag\">⏎<parameter "
                'name="enabled">true</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(run_parser([text]))
    assert message.tool_calls == []
    assert len(message.errors) == 1
    assert "set_flag" in message.errors[0].raw
    assert message.finish_reason == "stop"


def test_invalid_string_attribute_rejected():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="b" string="maybe">5'
                '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(run_parser([text], tools=F_TOOLS))
    assert message.tool_calls == []
    assert "maybe" in message.errors[0].message


def test_invalid_json_value_rejected():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="b" string="false">{"a": '
                '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert message.tool_calls == []
    assert "not valid JSON" in message.errors[0].message
    assert '{"a": ' in message.errors[0].raw


def test_invalid_json_kept_for_string_schema():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="false">hello'
                '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(run_parser([text], tools=F_TOOLS))
    assert arguments(message) == [{"a": "hello"}]
    assert len(message.warnings) == 1


def test_markerless_tags_in_content():
    text = dsml('⏎⏎<invoke name="read">⏎<parameter name="path" string="true">notes/a.txt'
                "</parameter>⏎</invoke>") + EOS
    message = parsed(assert_split_invariant(text, tools=[tool("read", path="string")]))
    assert message.content == ""
    assert arguments(message) == [{"path": "notes/a.txt"}]
    assert_no_dsml_leak(message)


def test_echoed_dsml_with_bad_name():
    text = dsml('<D tool_calls>⏎<D invoke name="record_item {⏎category: X⏎⏎Wait, this looks') + EOS
    message = parsed(assert_split_invariant(text, tools=[tool("record_item", category="string")]))
    assert message.tool_calls == []
    assert message.content == ""
    assert message.errors and "record_item {" in message.errors[0].raw


def test_undeclared_name_is_error():
    text = dsml('<D tool_calls>⏎<D invoke name="rm_rf">⏎<D parameter name="a" string="true">/'
                '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    events = run_parser([text], tools=F_TOOLS)
    assert not any(isinstance(e, ToolCallStart) for e in events)
    message = parsed(events)
    assert message.tool_calls == []
    assert "not declared" in message.errors[0].message
    assert message.errors[0].raw.startswith(f'<｜DSML｜invoke name="rm_rf">')


def test_incomplete_call_at_end_dropped():
    base = dsml('plan</think>⏎⏎<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" '
                'string="true">1</D parameter>⏎</D invoke>⏎')
    message = parsed(assert_split_invariant(base + EOS, mode="thinking", tools=F_TOOLS))
    assert message.reasoning_content == "plan"
    assert arguments(message) == [{"a": "1"}]
    truncated = base + dsml('<D invoke name="g">⏎<D param') + EOS
    tools = F_TOOLS + [tool("g", x="string")]
    message = parsed(assert_split_invariant(truncated, mode="thinking", tools=tools))
    assert names(message) == ["f"]
    assert len(message.errors) == 1
    assert '"g"' in message.errors[0].raw
    assert message.content == ""
    assert_no_dsml_leak(message)


def test_atomic_calls_hide_rejected_starts():
    text = dsml('<D tool_calls>⏎<D invoke name="g">⏎<D parameter name="x" string="true">1'
                '</D parameter>⏎<D param') + EOS
    streamed = run_parser([text], tools=[tool("g", x="string")])
    assert any(isinstance(e, ToolCallStart) for e in streamed)
    assert [e.index for e in streamed if isinstance(e, ParseError)] == [0]
    atomic = run_parser([text], tools=[tool("g", x="string")], atomic_calls=True)
    assert not any(isinstance(e, ToolCallStart | ToolCallArgumentsDelta) for e in atomic)
    assert [e.index for e in atomic if isinstance(e, ParseError)] == [None]


def test_scalar_invoke_body_rejected():
    text = dsml('<D tool_calls>⏎<D invoke name="w">"Haifa"</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=[tool("w", city="string")]))
    assert message.tool_calls == []
    assert '"Haifa"' in message.errors[0].raw


def test_text_after_block_reported():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎</D invoke>⏎</D tool_calls>and more') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{}]
    assert message.content == ""
    assert message.errors[0].raw == "and more"


# Reasoning and content separation.

def test_unclosed_reasoning():
    text = "Good morning! How can I help you today?" + EOS
    message = parsed(assert_split_invariant(text, mode="thinking"))
    assert message.reasoning_content == "Good morning! How can I help you today?"
    assert message.content == ""
    assert any("without </think>" in w.message for w in message.warnings)
    moved = parse_completion(text, mode="thinking", unclosed_reasoning_as_content=True)
    assert moved.content == "Good morning! How can I help you today?"
    assert moved.reasoning_content == ""


def test_tool_calls_inside_reasoning(tokenizer):
    text = dsml('Need the weather.⏎⏎<D tool_calls>⏎<D invoke name="w">⏎<D parameter name="c" '
                'string="true">Oslo</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, mode="thinking", tools=[tool("w", c="string")],
                                            tokenizer=tokenizer))
    assert message.reasoning_content == "Need the weather."
    assert message.content == ""
    assert arguments(message) == [{"c": "Oslo"}]
    assert message.finish_reason == "tool_calls"


def test_think_marker_split_across_deltas():
    message = parsed(run_parser(["plan</think>a </th", "ink> b" + EOS], mode="thinking"))
    assert message.content == "a </think> b"
    assert [w.raw for w in message.warnings] == ["</think>"]


def test_second_think_end_stays_content():
    text = "plan</think>Answer part 1</think>Answer part 2" + EOS
    message = parsed(assert_split_invariant(text, mode="thinking"))
    assert message.reasoning_content == "plan"
    assert message.content == "Answer part 1</think>Answer part 2"
    assert any("</think>" in w.message for w in message.warnings)


def test_no_tools_declared_means_no_calls():
    text = dsml('<D tool_calls>⏎<D invoke name="Bash">⏎<D parameter name="command" string="true">'
                'pwd</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(run_parser([text], tools=[]))
    assert message.tool_calls == []
    assert len(message.errors) == 1
    assert message.finish_reason == "stop"


# Finish reasons and empty output.

def test_finish_reason_follows_calls():
    assert parsed(run_parser(["plain answer" + EOS])).finish_reason == "stop"
    assert parsed(run_parser(["cut"])).finish_reason == "stop"
    parser = StreamParser(mode="chat")
    parser.feed_text("long")
    assert parser.finish("length")[-1] == MessageEnd("length")


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_immediate_end_of_sentence(mode):
    message = parsed(run_parser([EOS], mode=mode))
    assert (message.content, message.reasoning_content, message.tool_calls) == ("", "", [])
    assert message.finish_reason == "stop"


def test_content_whitespace_kept():
    message = parsed(assert_split_invariant("a\n\n b \n" + EOS))
    assert message.content == "a\n\n b \n"


def test_text_after_end_of_sentence_ignored():
    message = parsed(run_parser(["done" + EOS + "junk"]))
    assert message.content == "done"
    assert any("ignored" in w.message for w in message.warnings)


def test_event_order_for_one_call():
    text = dsml('Hi⏎⏎<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">x'
                '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    events = run_parser([text], tools=F_TOOLS)
    assert events == [
        ContentDelta("Hi"),
        ToolCallStart(0, "call_t_0", "f"),
        ToolCallArgumentsDelta(0, '{"a": "x"}'),
        ToolCallEnd(0, "call_t_0", "f", '{"a": "x"}', {"a": "x"}),
        MessageEnd("tool_calls"),
    ]


def test_warning_event_type():
    events = run_parser(["x</think>" + EOS])
    assert any(isinstance(e, ParseWarning) for e in events)


def test_duplicate_parameter_rejected():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">1'
                '</D parameter>⏎<D parameter name="a" string="true">2</D parameter>⏎'
                '</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert message.tool_calls == []
    assert "duplicate parameter 'a'" in message.errors[0].message


def test_empty_invoke_name_rejected():
    text = dsml('<D tool_calls>⏎<D invoke name="">⏎</D invoke>⏎</D tool_calls>') + EOS
    events = run_parser([text])
    assert not any(isinstance(e, ToolCallStart) for e in events)
    assert "empty name" in parsed(events).errors[0].message


def test_next_invoke_closes_previous():
    text = dsml('<D tool_calls>⏎<D invoke name="f">⏎<D parameter name="a" string="true">1'
                '</D parameter>⏎<D invoke name="f">⏎<D parameter name="a" string="true">2'
                '</D parameter>⏎</D invoke>⏎</D tool_calls>') + EOS
    message = parsed(assert_split_invariant(text, tools=F_TOOLS))
    assert arguments(message) == [{"a": "1"}, {"a": "2"}]
    assert [c["id"] for c in message.tool_calls] == ["call_t_0", "call_t_1"]
    assert any("invoke was not closed" in w.message for w in message.warnings)


def test_stray_closer_in_content_reported():
    message = parsed(assert_split_invariant(f"ok </{DSML}invoke> done" + EOS))
    assert message.content == "ok  done"
    assert message.errors[0].raw == f"</{DSML}invoke>"

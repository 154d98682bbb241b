"""DeepSeek's published V4 encoder vectors and the project's extra ones, byte for byte."""

import json

import pytest

from support.chat_helpers import FIXTURES
from dsv4.chat import encode_messages, parse_completion

OFFICIAL = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}
EXTRA = sorted(p.name.removesuffix(".input.json")
               for p in (FIXTURES / "extra").glob("*.input.json"))


def load_official(number: int) -> tuple[list, str]:
    data = json.loads((FIXTURES / f"test_input_{number}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    expected = (FIXTURES / f"test_output_{number}.txt").read_text(encoding="utf-8")
    return messages, expected


@pytest.mark.parametrize("number", sorted(OFFICIAL))
def test_official_vector(tokenizer, number):
    messages, expected = load_official(number)
    prompt = encode_messages(messages, mode=OFFICIAL[number], tokenizer=tokenizer)
    assert prompt.text == expected
    assert prompt.token_ids == tokenizer.encode_with_markers(expected)
    assert tokenizer.decode(prompt.token_ids) == expected


@pytest.mark.parametrize("name", EXTRA)
def test_extra_vector(tokenizer, name):
    case = json.loads((FIXTURES / "extra" / f"{name}.input.json").read_text(encoding="utf-8"))
    expected = (FIXTURES / "extra" / f"{name}.output.txt").read_text(encoding="utf-8")
    prompt = encode_messages(case["messages"], mode=case["mode"],
                             reasoning_effort=case["reasoning_effort"], tokenizer=tokenizer)
    assert prompt.text == expected
    assert prompt.token_ids == tokenizer.encode_with_markers(expected)


def test_request_level_tools_match_vector_one(tokenizer):
    data = json.loads((FIXTURES / "test_input_1.json").read_text(encoding="utf-8"))
    _, expected = load_official(1)
    prompt = encode_messages(data["messages"], data["tools"], tokenizer=tokenizer)
    assert prompt.text == expected


def assistant_turns(prompt: str) -> list[str]:
    """Cut each assistant turn (after its assistant marker and think marker, EOS included)."""
    turns = []
    for part in prompt.split("<｜Assistant｜>")[1:]:
        for opener in ("<think>", "</think>"):
            if part.startswith(opener):
                part = part[len(opener):]
                break
        end = part.index("<｜end▁of▁sentence｜>") + len("<｜end▁of▁sentence｜>")
        turns.append(part[:end])
    return turns


def test_vector_one_parses_back():
    messages, expected = load_official(1)
    first, second = assistant_turns(expected)
    call_turn = parse_completion(first, mode="thinking", tools=messages[0]["tools"])
    assert call_turn.reasoning_content == messages[2]["reasoning_content"]
    assert call_turn.content == ""
    assert len(call_turn.tool_calls) == 1
    function = call_turn.tool_calls[0]["function"]
    assert function["name"] == "get_weather"
    assert json.loads(function["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    assert call_turn.finish_reason == "tool_calls"
    assert call_turn.errors == []
    assert call_turn.warnings == []

    answer = parse_completion(second, mode="thinking", tools=messages[0]["tools"])
    assert answer.reasoning_content == messages[4]["reasoning_content"]
    assert answer.content == messages[4]["content"]
    assert answer.tool_calls == []
    assert answer.finish_reason == "stop"


def test_vector_two_last_turn_parses_back():
    messages, expected = load_official(2)
    last = assistant_turns(expected)[-1]
    parsed = parse_completion(last, mode="thinking")
    assert parsed.reasoning_content == messages[-1]["reasoning_content"]
    assert parsed.content == messages[-1]["content"]
    assert parsed.tool_calls == []


def test_vector_three_parses_back():
    messages, expected = load_official(3)
    first, second = assistant_turns(expected)
    parsed = parse_completion(first, mode="thinking", tools=messages[2]["tools"])
    assert parsed.reasoning_content == messages[3]["reasoning_content"]
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["search"]
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {
        "queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}
    assert parse_completion(second, mode="thinking").content == "请及时就医。"


def test_parallel_vector_parses_back():
    case = json.loads((FIXTURES / "extra" / "parallel_calls_sorted_results.input.json")
                      .read_text(encoding="utf-8"))
    expected = (FIXTURES / "extra" / "parallel_calls_sorted_results.output.txt").read_text(
        encoding="utf-8")
    parsed = parse_completion(assistant_turns(expected)[0], mode="thinking",
                              tools=case["messages"][0]["tools"])
    calls = case["messages"][2]["tool_calls"]
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "current_time"]
    for got, sent in zip(parsed.tool_calls, calls):
        assert json.loads(got["function"]["arguments"]) == json.loads(sent["function"]["arguments"])
    assert parsed.tool_calls[1]["function"]["arguments"] == "{}"

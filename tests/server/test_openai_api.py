"""The OpenAI-compatible endpoint driven by the official openai client and raw HTTP."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from dsv4.chat import default_tokenizer, encode_messages

MODEL = "dsv4-tiny"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                     "metric": {"type": "boolean"}},
                   "required": ["city"]}}}
DSML_CALL = ("Need the weather.</think>\n\n<｜DSML｜tool_calls>\n"
             '<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="metric" string="false">true</｜DSML｜parameter>\n'
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(text):
    return [{"role": "user", "content": text}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_counts_tokens(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("Hello"), max_tokens=5, seed=1)
    prompt = encode_messages(ask("Hello"), mode="thinking").token_ids
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens <= 5
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.model == MODEL
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def collect_stream(chunks):
    content, reasoning, finish, usage = "", "", None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
    return content, reasoning, finish, usage


@pytest.mark.parametrize("thinking", [True, False])
def test_stream_concatenates_to_the_plain_reply(client, thinking):
    extra = {"thinking": {"type": "enabled" if thinking else "disabled"}}
    kwargs = dict(model=MODEL, messages=ask("Tell me a story"), max_tokens=12, seed=7, temperature=1.0,
                  extra_body=extra)
    plain = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    content, reasoning, finish, usage = collect_stream(stream)
    message = plain.choices[0].message
    assert content == (message.content or "")
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    if thinking:
        assert reasoning or content  # thinking prompts open with <think>: output is reasoning first


def test_async_client_streams(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=4,
                                                      stream=True, seed=3)
        chunks = [chunk async for chunk in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_forced_tool_call_comes_back_typed(client, forced):
    marker = forced.set("weather", DSML_CALL)
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=ask(marker), tools=[WEATHER_TOOL], max_tokens=200)
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    for call in choice.delta.tool_calls or []:
                        entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                        entry["id"] = call.id or entry["id"]
                        entry["name"] += (call.function.name or "") if call.function else ""
                        entry["arguments"] += (call.function.arguments or "") if call.function else ""
            assert finish == "tool_calls"
            assert len(calls) == 1
            call = calls[0]
            assert call["id"]
        else:
            reply = client.chat.completions.create(**kwargs)
            assert reply.choices[0].finish_reason == "tool_calls"
            message = reply.choices[0].message
            assert message.reasoning_content == "Need the weather."
            assert not message.content
            assert len(message.tool_calls) == 1
            fn = message.tool_calls[0].function
            call = {"name": fn.name, "arguments": fn.arguments, "id": message.tool_calls[0].id}
        assert call["name"] == "get_weather"
        assert json.loads(call["arguments"]) == {"city": "Oslo", "days": 3, "metric": True}


def test_tool_result_round_trip(client, forced):
    marker = forced.set("weather2", DSML_CALL)
    reply = client.chat.completions.create(model=MODEL, messages=ask(marker), tools=[WEATHER_TOOL], max_tokens=200)
    message = reply.choices[0].message
    answer = forced.set("answer", "Done thinking.</think>It is cold in Oslo.<｜end▁of▁sentence｜>")
    history = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": message.content, "reasoning_content": message.reasoning_content,
         "tool_calls": [call.model_dump() for call in message.tool_calls]},
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temp": -3}'},
        {"role": "user", "content": answer},
    ]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=50)
    assert final.choices[0].message.content == "It is cold in Oslo."
    assert final.choices[0].message.reasoning_content == "Done thinking."
    assert final.choices[0].finish_reason == "stop"
    # Interleaved thinking: with tools declared, the earlier turn's reasoning stays in the prompt.
    prompt = encode_messages(history, [WEATHER_TOOL], mode="thinking").text
    assert "Need the weather." in prompt
    assert final.usage.prompt_tokens == len(encode_messages(history, [WEATHER_TOOL]).token_ids)


def test_malformed_call_returns_content_not_empty_call(client, forced):
    broken = ("x</think><｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"launch_rocket\">\n"
              "<｜DSML｜parameter name=\"target\" string=\"true\">moon</｜DSML｜parameter>\n"
              "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>")
    marker = forced.set("broken", broken)
    reply = client.chat.completions.create(model=MODEL, messages=ask(marker), tools=[WEATHER_TOOL], max_tokens=200)
    message = reply.choices[0].message
    assert not message.tool_calls
    assert "launch_rocket" in message.content
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=3, logprobs=True,
                                           top_logprobs=2, seed=5)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_stop_string(client, forced):
    marker = forced.set("stop", "</think>alpha beta gamma delta<｜end▁of▁sentence｜>")
    reply = client.chat.completions.create(model=MODEL, messages=ask(marker), stop=["gamma"], max_tokens=50)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "alpha beta "
    streamed, _, finish, _ = collect_stream(client.chat.completions.create(
        model=MODEL, messages=ask(marker), stop=["gamma"], max_tokens=50, stream=True))
    assert streamed == "alpha beta "
    assert finish == "stop"


# ---------------------------------------------------------------------- errors

def raw_post(server, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url("/v1/chat/completions"), content=data,
                      headers={"Content-Type": "application/json"}, timeout=60)


def error_of(response):
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]


def test_malformed_json(server):
    response = raw_post(server, None, raw=b'{"model": ')
    assert response.status_code == 400
    assert "not valid JSON" in error_of(response)["message"]


@pytest.mark.parametrize("change,param", [
    ({"n": 2}, "n"),
    ({"temperature": 5}, "temperature"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"best_of": 3}, "best_of"),
    ({"messages": []}, "messages"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
])
def test_invalid_parameters_name_the_parameter(server, change, param):
    body = {"model": MODEL, "messages": ask("hi"), **change}
    response = raw_post(server, body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


def test_unknown_tool_call_id(server):
    body = {"model": MODEL, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_missing", "content": "42"}]}
    response = raw_post(server, body)
    assert response.status_code == 400
    assert "call_missing" in error_of(response)["message"]


def test_prompt_longer_than_context(server):
    service = server.app.state.service
    limit = service.max_model_len
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": limit}
    error = error_of(raw_post(server, body))
    assert str(limit) in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_retired_model_names(server):
    for name, thinking in (("deepseek-chat", "disabled"), ("deepseek-reasoner", "enabled")):
        response = raw_post(server, {"model": name, "messages": ask("hi")})
        assert response.status_code == 404
        message = error_of(response)["message"]
        assert "2026-07-24" in message and "deepseek-v4-flash" in message and thinking in message


def test_unknown_model(server):
    response = raw_post(server, {"model": "gpt-9", "messages": ask("hi")})
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


def test_health_and_metrics(server, client):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    client.chat.completions.create(model=MODEL, messages=ask("count me"), max_tokens=2)
    text = httpx.get(server.url("/metrics")).text
    assert "dsv4_requests_total" in text
    assert "dsv4_time_to_first_token_seconds_bucket" in text
    assert "dsv4_cache_bytes_total" in text


def test_ignore_eos_runs_to_max_tokens(client, forced):
    marker = forced.set("early_end", "x</think>Hi<｜end▁of▁sentence｜>")
    stopped = client.chat.completions.create(model=MODEL, messages=ask(marker), max_tokens=8)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 8
    continued = client.chat.completions.create(model=MODEL, messages=ask(marker), max_tokens=8,
                                               extra_body={"ignore_eos": True})
    assert continued.choices[0].finish_reason == "length"
    assert continued.usage.completion_tokens == 8


def test_ignore_eos_must_be_boolean(client):
    with pytest.raises(openai.BadRequestError, match="ignore_eos must be true or false"):
        client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2, extra_body={"ignore_eos": "yes"})

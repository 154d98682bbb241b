"""Validation of ``POST /v1/chat/completions`` bodies into a typed request.

Every parameter the endpoint accepts is listed here; anything else is rejected with a 400
that names it, so a client never believes a setting took effect when it did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv4.server.errors import invalid

# Parameters accepted and ignored: they change nothing in a local single-tenant server.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_KNOWN = {
    "model", "messages", "tools", "tool_choice", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "stop", "seed", "logprobs", "top_logprobs", "stream",
    "stream_options", "response_format", "thinking", "reasoning_effort", "n",
    "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "ignore_eos",
} | _IGNORED


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens even past end-of-sentence
    include_usage: bool = False
    response_format: Any = None
    thinking: bool = True
    reasoning_effort: str | None = None


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low} and {high}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"{name} must be {bound}, got {value}", name)
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded JSON body and return a ChatRequest; raises APIError (400) otherwise."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise invalid(f"unsupported parameter(s) {unknown}; dsv4 accepts {sorted(_KNOWN)}", unknown[0])

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: the name of the served model (see GET /v1/models)", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of chat messages", "messages")

    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise invalid(f"n={n} is not supported: dsv4 returns one choice per request; send "
                      f"{n} requests (with different seeds) instead", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise invalid(f"{name} is not supported by dsv4 (DeepSeek-V4 ignores it too); remove "
                          f"it or set it to 0", name)
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported by dsv4; remove it", "logit_bias")

    request = ChatRequest(model=model, messages=messages)
    request.temperature = _number(body, "temperature", 0.0, 2.0)
    request.top_p = _number(body, "top_p", 0.0, 1.0)
    if request.top_p == 0.0:
        raise invalid("top_p must be greater than 0", "top_p")
    request.top_k = _integer(body, "top_k", 0)
    request.seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    for name in ("max_completion_tokens", "max_tokens"):
        value = _integer(body, name, 1)
        if value is not None:
            request.max_tokens = value
            break

    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        request.stop = [s for s in stop if s]
    elif stop is not None:
        raise invalid(f"stop must be a string or a list of at most 16 strings, got {stop!r}", "stop")

    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid(f"logprobs must be true or false, got {logprobs!r}", "logprobs")
    request.logprobs = bool(logprobs)
    top = _integer(body, "top_logprobs", 0, 20)
    if top is not None:
        if not request.logprobs:
            raise invalid("top_logprobs requires logprobs: true", "top_logprobs")
        request.top_logprobs = top

    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise invalid(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    request.ignore_eos = ignore_eos

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid(f"stream must be true or false, got {stream!r}", "stream")
    request.stream = stream
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid(f"stream_options must be an object with include_usage, got {options!r}",
                          "stream_options")
        if not stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        request.include_usage = bool(options.get("include_usage", False))

    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid(f"tools must be a list of function tools, got {type(tools).__name__}", "tools")
    request.tools = tools or None
    request.tool_choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid(f"parallel_tool_calls must be true or false, got {parallel!r}", "parallel_tool_calls")
    request.parallel_tool_calls = parallel
    request.response_format = body.get("response_format")

    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled"):
            raise invalid(f'thinking must be {{"type": "enabled"}} or {{"type": "disabled"}}, got '
                          f"{thinking!r}", "thinking")
        request.thinking = kind == "enabled"
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise invalid(f"reasoning_effort must be a string, got {effort!r}", "reasoning_effort")
    request.reasoning_effort = effort
    return request

"""``POST /v1/chat/completions``: prompt encoding, admission, streaming and the final reply."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsv4.chat import ChatFormatError, encode_messages
from dsv4.engine.sampler import SamplingParams
from dsv4.server.completion import CompletionBuilder
from dsv4.server.engine_loop import QueueFull
from dsv4.server.errors import APIError, invalid
from dsv4.server.protocol import ChatRequest, parse_chat_request

logger = logging.getLogger(__name__)
router = APIRouter()

# Retired DeepSeek API names: (thinking, replacement advice).
LEGACY_MODELS = {
    "deepseek-chat": (False, 'model "deepseek-v4-flash" with thinking disabled ({"thinking": {"type": "disabled"}})'),
    "deepseek-reasoner": (True, 'model "deepseek-v4-flash" with thinking enabled ({"thinking": {"type": "enabled"}})'),
}


@router.post("/v1/chat/completions")
async def chat_completions(http_request: Request):
    service = http_request.app.state.service
    try:
        body = json.loads(await http_request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(f"the request body is not valid JSON: {error}") from None
    request = parse_chat_request(body)
    headers = service.resolve_model(request)
    prompt = service.encode(request)
    params = service.sampling_params(request, len(prompt))
    request_id = f"chatcmpl-{secrets.token_hex(12)}"
    try:
        outputs = service.loop.submit(request_id, prompt, params)
    except QueueFull as error:
        service.metrics.requests.labels("rejected_busy").inc()
        raise APIError(429, f"the server is at capacity ({service.loop.held} requests held); retry "
                       f"after {error.retry_after_s} s", type="rate_limit_error", code="server_busy",
                       headers={"Retry-After": str(error.retry_after_s)}) from None
    builder = CompletionBuilder(request_id, service.tokenizer, request.thinking, request.tools,
                                request.tool_choice, request.parallel_tool_calls,
                                request.top_logprobs if request.logprobs else None, request.stop)
    run = _Run(service, request, request_id, builder, outputs, time.monotonic())
    if request.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream", headers=headers)
    return JSONResponse(await run.collect(http_request), headers=headers)


class _Run:
    """One admitted request: reads its engine outputs and shapes the reply."""

    def __init__(self, service, request: ChatRequest, request_id: str, builder: CompletionBuilder,
                 outputs: asyncio.Queue, started: float):
        self.service = service
        self.request = request
        self.request_id = request_id
        self.builder = builder
        self.outputs = outputs
        self.started = started
        self.created = int(time.time())
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished = False

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": kind, "created": self.created,
                "model": self.service.served_model_name, "system_fingerprint": self.service.fingerprint}

    async def _next(self):
        item = await self.outputs.get()
        if item is None:
            raise _Gone()
        if isinstance(item, Exception):
            raise invalid(str(item))
        now = time.monotonic()
        if item.new_token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                self.service.metrics.time_to_first_token.observe(now - self.started)
            elif self.last_token_at is not None:
                gap = (now - self.last_token_at) / len(item.new_token_ids)
                for _ in item.new_token_ids:
                    self.service.metrics.inter_token.observe(gap)
            self.last_token_at = now
        self.finished = item.finished
        return item

    async def collect(self, http_request: Request) -> dict[str, Any]:
        try:
            while not self.finished:
                getter = asyncio.ensure_future(self._next())
                while not getter.done():
                    await asyncio.wait({getter}, timeout=0.25)
                    if not getter.done() and await http_request.is_disconnected():
                        getter.cancel()
                        raise _Gone()
                self.builder.feed(getter.result())
        finally:
            self._close()
        state = self.builder.state
        choice: dict[str, Any] = {"index": 0, "message": self.builder.message(),
                                  "finish_reason": state.finish_reason, "logprobs": None}
        if self.request.logprobs:
            choice["logprobs"] = {"content": state.logprobs}
        return {**self._base("chat.completion"), "choices": [choice], "usage": self.builder.usage()}

    async def stream(self) -> AsyncIterator[str]:
        try:
            yield self._sse([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            while not self.finished:
                output = await self._next()
                deltas, logprobs = self.builder.feed(output)
                if logprobs and not deltas:
                    deltas = [{}]
                for i, delta in enumerate(deltas):
                    entry: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                    if logprobs and i == 0:
                        entry["logprobs"] = {"content": logprobs}
                    yield self._sse([entry])
            yield self._sse([{"index": 0, "delta": {}, "logprobs": None,
                              "finish_reason": self.builder.state.finish_reason}])
            if self.request.include_usage:
                yield self._sse([], usage=self.builder.usage())
            yield "data: [DONE]\n\n"
        finally:
            self._close()

    def _sse(self, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        chunk = {**self._base("chat.completion.chunk"), "choices": choices}
        if usage is not None or self.request.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def _close(self) -> None:
        """Log the request; if it is still running (client gone), cancel it and free its cache."""
        state = self.builder.state
        status = state.finish_reason or "disconnected"
        if not self.finished:
            self.service.loop.abort(self.request_id)
            status = "disconnected"
        metrics = self.service.metrics
        metrics.requests.labels(status).inc()
        metrics.prompt_tokens.inc(state.prompt_tokens)
        metrics.completion_tokens.inc(state.completion_tokens)
        metrics.cached_tokens.inc(state.cached_tokens)
        elapsed = time.monotonic() - self.started
        ttft = (self.first_token_at - self.started) * 1000 if self.first_token_at else float("nan")
        logger.info("request id=%s status=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d "
                    "ttft_ms=%.1f total_ms=%.1f tok_per_s=%.1f", self.request_id, status, state.prompt_tokens,
                    state.cached_tokens, state.completion_tokens, ttft, elapsed * 1000,
                    state.completion_tokens / elapsed if elapsed > 0 else 0.0)


class _Gone(Exception):
    """The request was cancelled on the engine side (shutdown) or the client left."""


class ChatService:
    """Everything the chat route needs, built once in the app's lifespan."""

    def __init__(self, settings, loop, tokenizer, metrics, served_model_name: str, max_model_len: int):
        self.settings = settings
        self.loop = loop
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.fingerprint = "dsv4"

    def resolve_model(self, request: ChatRequest) -> dict[str, str]:
        """Check the model name; apply a legacy alias when enabled. Returns extra headers."""
        if request.model == self.served_model_name:
            return {}
        if request.model in LEGACY_MODELS:
            thinking, replacement = LEGACY_MODELS[request.model]
            message = f"{request.model} was retired on 2026-07-24; use {replacement}"
            if not self.settings.legacy_aliases:
                raise APIError(404, f"{message}. This server serves {self.served_model_name!r}; start it "
                               f"with --legacy-aliases to map the old name.", param="model",
                               code="model_not_found")
            request.thinking = thinking
            return {"Deprecation": "true", "Warning": f'299 dsv4 "{message}"'}
        raise APIError(404, f"model {request.model!r} does not exist; this server serves "
                       f"{self.served_model_name!r}", param="model", code="model_not_found")

    def encode(self, request: ChatRequest) -> list[int]:
        try:
            prompt = encode_messages(request.messages, request.tools,
                                     mode="thinking" if request.thinking else "chat",
                                     reasoning_effort=request.reasoning_effort, family=self.settings.family,
                                     tool_choice=request.tool_choice, response_format=request.response_format,
                                     tokenizer=self.tokenizer)
        except ChatFormatError as error:
            text = str(error)
            param = text.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0] if ":" in text else None
            raise invalid(text, param) from None
        return prompt.token_ids

    def sampling_params(self, request: ChatRequest, prompt_tokens: int) -> SamplingParams:
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise invalid(f"the prompt has {prompt_tokens} tokens but the context limit is {self.max_model_len}; "
                          f"shorten the messages", "messages", code="context_length_exceeded")
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(room, self.settings.default_max_tokens)
        elif max_tokens > room:
            raise invalid(f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the "
                          f"context of {self.max_model_len} tokens; ask for at most {room}", "max_tokens",
                          code="context_length_exceeded")
        forced = self.settings.forced_tokens(request) if self.settings.forced_tokens else None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            seed=request.seed,
            stop=tuple(request.stop),
            logprobs=request.top_logprobs if request.logprobs else None,
            forced_tokens=forced,
            stop_token_ids=() if request.ignore_eos else (self.tokenizer.eos_id,),
            ignore_eos=request.ignore_eos,
        )

"""The FastAPI application: settings, lifespan (engine start/stop) and the small routes.

The model and engine are created in the lifespan, never at import, so importing this module
is cheap and tests can build apps with their own settings.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from dsv4.server import chat_route
from dsv4.server.errors import APIError, api_error_handler

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model: str = "tiny"  # checkpoint directory or "tiny"
    served_model_name: str | None = None  # default: derived from the checkpoint
    max_running: int = 16  # sequences decoded together
    max_queued: int = 64  # admitted requests waiting for a batch slot; more get 429
    max_model_len: int | None = None  # context limit in tokens; default: the model's
    default_max_tokens: int = 1024  # completion limit when a request gives none
    legacy_aliases: bool = False  # map deepseek-chat / deepseek-reasoner instead of rejecting them
    family: str = "v4"  # chat-format family for reasoning effort ("v4" or "v4-0731")
    numerics: str = "reference"
    storage: str = "float"  # KV cache storage: "float" or "deployment" (FP8 / FP4)
    prefill_chunk: int = 1024
    # Test hook: returns the token ids a request must produce (the model still runs on them).
    forced_tokens: Callable[[Any], list[int] | None] | None = None


def default_served_name(path: str) -> str:
    """``deepseek-v4-flash`` / ``-pro`` for the released shapes, else the directory name."""
    if path == "tiny":
        return "dsv4-tiny"
    from dsv4.config import ModelConfig, load_preset

    config = ModelConfig.from_file(path)
    for name in ("flash", "pro"):
        preset = load_preset(name)
        if (config.hidden_size, config.num_hidden_layers) == (preset.hidden_size, preset.num_hidden_layers):
            return f"deepseek-v4-{name}"
    return Path(path).resolve().name


def build_service(settings: ServerSettings):
    """Load the model and tokenizer, start the engine thread; returns the ChatService."""
    from dsv4.chat import default_tokenizer
    from dsv4.engine.engine import SMALL_MODEL_CACHE_BYTES, EngineConfig, LLMEngine
    from dsv4.engine.scheduler import SchedulerConfig
    from dsv4.model.loading import load_model
    from dsv4.server.engine_loop import EngineLoop
    from dsv4.server.metrics import ServerMetrics

    started = time.monotonic()
    model = load_model(settings.model, numerics=settings.numerics)
    tokenizer = default_tokenizer()
    scheduler = SchedulerConfig(max_running=settings.max_running, prefill_chunk=settings.prefill_chunk,
                                max_batched_tokens=max(settings.prefill_chunk, 2 * settings.max_running))
    engine = LLMEngine(model, EngineConfig(storage=settings.storage, scheduler=scheduler, upcast_weights=True,
                                           dequantized_cache_bytes=SMALL_MODEL_CACHE_BYTES),
                       detokenize=tokenizer.decode)
    loop = EngineLoop(engine, settings.max_running, settings.max_queued)
    metrics = ServerMetrics(loop.metrics, lambda: loop.held)
    max_len = settings.max_model_len or model.config.max_position_embeddings
    name = settings.served_model_name or default_served_name(settings.model)
    service = chat_route.ChatService(settings, loop, tokenizer, metrics, name, max_len)
    loop.start()
    logger.info("serving %s as %r (context %d tokens) after %.1f s", settings.model, name, max_len,
                time.monotonic() - started)
    return service


def create_app(settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = build_service(settings)
        app.state.started = int(time.time())
        try:
            yield
        finally:
            logger.info("shutting down: cancelling %d requests", app.state.service.loop.held)
            app.state.service.loop.stop()

    app = FastAPI(title="dsv4", lifespan=lifespan)
    app.add_exception_handler(APIError, api_error_handler)

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(error)).body(), status_code=400)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(chat_route.router)

    @app.get("/v1/models")
    async def list_models(request: Request):
        service = request.app.state.service
        return {"object": "list", "data": [{"id": service.served_model_name, "object": "model",
                                            "created": request.app.state.started, "owned_by": "dsv4",
                                            "max_model_len": service.max_model_len}]}

    @app.get("/health")
    async def health(request: Request):
        alive = request.app.state.service.loop.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.service.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

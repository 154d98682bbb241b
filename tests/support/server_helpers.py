"""A real dsv4 server on a loopback port for tests, and forced completions.

The model is the embedded ``tiny`` checkpoint (random weights). Tests that need a particular
completion (DSML tool calls) register forced token ids: the model, engine, parser, SSE and the
client all run for real, only the sampled ids are dictated.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from dsv4.chat import default_tokenizer
from dsv4.server.app import ServerSettings, create_app

FORCE_PREFIX = "FORCE:"


class ForcedCompletions:
    """Maps a marker in the last user message (``FORCE:<key>``) to completion token ids."""

    def __init__(self):
        self.by_key: dict[str, list[int]] = {}

    def set(self, key: str, completion_text: str) -> str:
        tokenizer = default_tokenizer()
        self.by_key[key] = tokenizer.encode_with_markers(completion_text)
        return FORCE_PREFIX + key

    def __call__(self, request) -> list[int] | None:
        last = request.messages[-1].get("content")
        if isinstance(last, str) and last.startswith(FORCE_PREFIX):
            return self.by_key.get(last[len(FORCE_PREFIX):])
        return None


class RunningServer:
    def __init__(self, settings: ServerSettings, shutdown_timeout_s: float = 2.0):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=shutdown_timeout_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the test server did not become healthy within 300 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return self.url("/v1")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)

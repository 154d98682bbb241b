"""Runs an LLMEngine in a background thread and hands its outputs to asyncio tasks.

The engine is not thread-safe, so every call into it (add, abort, step) happens on the engine
thread. Request handlers submit commands through a queue and read their outputs from a
per-request ``asyncio.Queue`` that the thread fills with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dsv4.engine.engine import LLMEngine, RequestOutput
from dsv4.engine.sampler import SamplingParams

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The server already has as many requests as it admits; the client should retry later."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server busy; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Submission:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.monotonic)


class EngineLoop:
    """Owns the engine thread; ``max_running + max_queued`` bounds the requests held."""

    def __init__(self, engine: LLMEngine, max_running: int, max_queued: int):
        self.engine = engine
        self.max_running = max_running
        self.max_queued = max_queued
        self._commands: queue.Queue = queue.Queue()
        self._active: dict[str, Submission] = {}
        self._lock = threading.Lock()  # guards _active's size for admission
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel every request still held (each gets finish_reason "abort") and join."""
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.1f s", timeout_s)

    # ------------------------------------------------------------------ requests

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a request; its RequestOutputs arrive on the returned queue (None = gone)."""
        with self._lock:
            if len(self._active) >= self.max_running + self.max_queued:
                raise QueueFull(retry_after_s=1)
            loop = asyncio.get_running_loop()
            submission = Submission(request_id, prompt, params, asyncio.Queue(), loop)
            self._active[request_id] = submission
        self._commands.put(("add", submission))
        return submission.outputs

    def abort(self, request_id: str) -> None:
        """Cancel a request (a disconnected client); its cache is freed on the engine thread."""
        self._commands.put(("abort", request_id))

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def held(self) -> int:
        return len(self._active)

    def metrics(self) -> dict[str, Any]:
        """The engine's last metrics snapshot (taken on the engine thread after each step)."""
        return dict(self._metrics)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        logger.info("engine thread started")
        was_busy = False
        while not self._stopping.is_set():
            busy = self.engine.has_unfinished_requests()
            if was_busy and not busy:
                _release_free_memory()
            was_busy = busy
            self._drain_commands(block=not busy)
            if self._stopping.is_set() or not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a model failure must not kill the server silently
                logger.exception("engine step failed; aborting %d requests", len(self._active))
                self._abort_all("error")
                continue
            for output in outputs:
                self._deliver(output)
            self._metrics = self.engine.metrics()
        self._drain_commands(block=False)
        self._abort_all("abort")
        logger.info("engine thread stopped")

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            submission: Submission = payload
            try:
                self.engine.add_request(submission.request_id, submission.prompt, submission.params)
            except ValueError as error:
                logger.warning("request %s rejected by the engine: %s", submission.request_id, error)
                self._finish(submission.request_id, error)
            else:
                self._metrics = self.engine.metrics()
        elif kind == "abort":
            if self.engine.abort_request(payload):
                self._metrics = self.engine.metrics()
            self._finish(payload, None)

    def _deliver(self, output: RequestOutput) -> None:
        submission = self._active.get(output.request_id)
        if submission is None:
            return
        submission.loop.call_soon_threadsafe(submission.outputs.put_nowait, output)
        if output.finished:
            with self._lock:
                self._active.pop(output.request_id, None)

    def _finish(self, request_id: str, error: Exception | None) -> None:
        with self._lock:
            submission = self._active.pop(request_id, None)
        if submission is not None:
            submission.loop.call_soon_threadsafe(submission.outputs.put_nowait, error)

    def _abort_all(self, reason: str) -> None:
        for request_id in list(self._active):
            self.engine.abort_request(request_id)
            submission = self._active.get(request_id)
            if submission is None:
                continue
            output = RequestOutput(request_id, [], None, True, reason, len(submission.prompt), 0, 0)
            self._deliver(output)
        self._metrics = self.engine.metrics()


def _release_free_memory() -> None:
    """Return freed heap pages to the OS when the engine goes idle (glibc keeps them otherwise,
    so RSS would stay at its peak after a burst of requests)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

"""Client disconnects free their cache; a full queue answers 429; shutdown cancels cleanly."""

import threading
import time

import httpx

from dsv4.server.app import ServerSettings
from support.server_helpers import RunningServer, metric_value

MODEL = "dsv4-tiny"


def long_request(max_tokens=400):
    """A streamed request that runs to max_tokens: the random model may sample end-of-sentence."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": max_tokens,
            "stream": True, "seed": 1, "ignore_eos": True}


def wait_until_idle(server, timeout_s=60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(server.url("/metrics")).text
        if metric_value(text, "dsv4_requests_held") == 0 and metric_value(text, "dsv4_cache_bytes_total") == 0:
            return text
        time.sleep(0.2)
    raise AssertionError(f"the server still holds requests or cache after {timeout_s} s:\n{text}")


def test_disconnect_cancels_and_frees_cache(server):
    wait_until_idle(server)
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=long_request(), timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break
        held = metric_value(httpx.get(server.url("/metrics")).text, "dsv4_cache_bytes_total")
        assert held > 0
    # Leaving the block closed the connection mid-stream.
    text = wait_until_idle(server)
    assert 'dsv4_requests_total{status="disconnected"}' in text


def test_full_queue_answers_429_with_retry_after():
    running = RunningServer(ServerSettings(model="tiny", max_running=1, max_queued=0, default_max_tokens=8))
    try:
        holder = httpx.stream("POST", running.url("/v1/chat/completions"), json=long_request(2000), timeout=60)
        response = holder.__enter__()
        assert response.status_code == 200
        # Keep the line iterator: once it is garbage-collected, httpx closes the connection and
        # the server cancels the holder, racing the next request.
        lines = response.iter_lines()
        next(lines)
        busy = httpx.post(running.url("/v1/chat/completions"), json={**long_request(4), "stream": False})
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        holder.__exit__(None, None, None)
        wait_until_idle(running)
        ok = httpx.post(running.url("/v1/chat/completions"), json={**long_request(2), "stream": False}, timeout=60)
        assert ok.status_code == 200
    finally:
        running.stop()


def test_shutdown_cancels_in_flight_requests():
    running = RunningServer(ServerSettings(model="tiny", max_running=2, max_queued=2))
    results = []

    def reader():
        try:
            with httpx.stream("POST", running.url("/v1/chat/completions"), json=long_request(5000),
                              timeout=60) as response:
                for line in response.iter_lines():
                    results.append(line)
        except httpx.HTTPError as error:
            results.append(f"error: {error}")

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + 60
    while len(results) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    running.stop()
    thread.join(30)
    assert not thread.is_alive()
    # In-flight requests get the grace period (2 s here), then they are cancelled.
    assert time.monotonic() - started < 20
    assert not any(line.startswith("data: [DONE]") for line in results)
    assert not running.thread.is_alive()
    assert not running.app.state.service.loop.is_alive()

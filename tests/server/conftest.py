"""Fixtures: one real dsv4 server (the embedded tiny model) shared by the server tests."""

import pytest

from dsv4.server.app import ServerSettings
from support.server_helpers import ForcedCompletions, RunningServer


@pytest.fixture(scope="session")
def forced() -> ForcedCompletions:
    return ForcedCompletions()


@pytest.fixture(scope="session")
def server(forced):
    settings = ServerSettings(model="tiny", max_running=4, max_queued=8, default_max_tokens=8,
                              forced_tokens=forced)
    running = RunningServer(settings)
    yield running
    running.stop()

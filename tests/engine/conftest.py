"""Shared fixtures of the engine tests: small random-weight models built in memory."""

from __future__ import annotations

import pytest
import torch

from dsv4.model.transformer import Transformer
from support.engine_helpers import random_model


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run engine tests on one torch thread.

    Their tensors are tiny, and on a busy 2-core machine handing each small op to a second
    thread made batched decode steps about 10x slower than running them on one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def models():
    """Cached random models by (preset, numerics)."""
    cache: dict[tuple[str, str], Transformer] = {}

    def get(preset: str = "test-mix", numerics: str = "plain") -> Transformer:
        key = (preset, numerics)
        if key not in cache:
            cache[key] = random_model(preset, numerics)
        return cache[key]

    return get

"""Shared fixtures of the engine tests: small random-weight models built in memory."""

from __future__ import annotations

import pytest
from dsv4.model.transformer import Transformer
from support.engine_helpers import random_model


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

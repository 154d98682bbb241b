"""Shared fixtures of the chat-format tests."""

from __future__ import annotations

import pytest

from dsv4.chat import Tokenizer, default_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return default_tokenizer()

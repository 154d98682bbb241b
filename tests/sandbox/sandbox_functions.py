"""Module-level functions for ``Sandbox.call`` tests (callables travel by reference)."""

from __future__ import annotations

import os


def add(a: int, b: int) -> int:
    return a + b


def describe_process() -> dict:
    return {"uid": os.getuid(), "cwd": os.getcwd(), "tmpdir": os.environ.get("TMPDIR", "")}


def fail_with(message: str) -> None:
    raise ValueError(message)


def allocate_mb(count: int) -> int:
    blocks = [bytearray(1 << 20) for _ in range(count)]
    return len(blocks)

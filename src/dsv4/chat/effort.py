"""Reasoning-effort tiers per model family, and the prompt prefix each tier adds.

The tokenizer is the same for every family, so the caller names the family. The original V4
checkpoints know `high` (the default, no prefix) and `max`. The 0731 refresh of V4-Flash moved
the tiers down one: `low` is the default with no prefix, `high` gets the text that `max` had on
the original checkpoints, and `max` gets a new, stronger text.
"""

from __future__ import annotations

from dsv4.chat.errors import ChatFormatError
from dsv4.chat.templates import EFFORT_ABSOLUTE_MAXIMUM, EFFORT_BEYOND_MAXIMUM

FAMILIES = ("v4", "v4-0731")

# Family -> tier -> prefix placed right after BOS in thinking mode.
_PREFIXES: dict[str, dict[str, str]] = {
    "v4": {"high": "", "max": EFFORT_ABSOLUTE_MAXIMUM},
    "v4-0731": {"low": "", "high": EFFORT_ABSOLUTE_MAXIMUM, "max": EFFORT_BEYOND_MAXIMUM},
}

# Other effort names that OpenAI-style clients send, mapped as DeepSeek's API documentation
# maps them (launch-era table for the original family, later table for 0731).
_ALIASES: dict[str, dict[str, str]] = {
    "v4": {"minimal": "high", "low": "high", "medium": "high", "xhigh": "max", "ultra": "max"},
    "v4-0731": {"minimal": "low", "medium": "high", "xhigh": "high", "ultra": "max"},
}


def resolve_effort(effort: str | None, family: str) -> str | None:
    """Map an effort name (tier or alias) to a tier of `family`; None stays None."""
    if family not in _PREFIXES:
        raise ChatFormatError(
            f"family: unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if effort is None:
        return None
    tiers = _PREFIXES[family]
    if effort in tiers:
        return effort
    if effort in _ALIASES[family]:
        return _ALIASES[family][effort]
    accepted = sorted(set(tiers) | set(_ALIASES[family]))
    raise ChatFormatError(
        f"reasoning_effort: invalid value {effort!r} for family {family!r}; "
        f"expected one of {', '.join(accepted)} or None")


def effort_prefix(effort: str | None, family: str) -> str:
    """Return the text that `effort` adds after BOS in thinking mode ('' for none)."""
    tier = resolve_effort(effort, family)
    if tier is None:
        return ""
    return _PREFIXES[family][tier]

"""Helpers of the chat-format tests: fixture paths, repro shorthand, split-invariance checks."""

from __future__ import annotations

from pathlib import Path

from dsv4.chat import StreamParser, Tokenizer, coalesce_events

FIXTURES = Path(__file__).resolve().parents[1] / "chat" / "fixtures"
DSML = "｜DSML｜"
EOS = "<｜end▁of▁sentence｜>"


def dsml(text: str) -> str:
    """Expand the shorthand of the bug-report repros: ``<D x>`` is ``<｜DSML｜x>``, ⏎ a newline."""
    return text.replace("<D ", f"<{DSML}").replace("</D ", f"</{DSML}").replace("⏎", "\n")


def run_parser(chunks: list[str], mode: str = "chat", tools=None, **options) -> list:
    """Feed `chunks` one by one and finish; return the coalesced events."""
    parser = StreamParser(mode=mode, tools=tools, call_id_prefix="t", **options)
    events = []
    for chunk in chunks:
        events += parser.feed_text(chunk)
    events += parser.finish()
    return coalesce_events(events)


def assert_split_invariant(text: str, mode: str = "chat", tools=None,
                           tokenizer: Tokenizer | None = None) -> list:
    """Check that chunked feeding gives the events of the whole text, and return them.

    The chunkings are every two-way split, one character at a time, and, given a tokenizer,
    one token at a time.
    """
    whole = run_parser([text], mode, tools)
    for cut in range(1, len(text)):
        assert run_parser([text[:cut], text[cut:]], mode, tools) == whole, f"split at {cut}"
    assert run_parser(list(text), mode, tools) == whole
    if tokenizer is not None:
        parser = StreamParser(mode=mode, tools=tools, call_id_prefix="t", tokenizer=tokenizer)
        events = []
        for token_id in tokenizer.encode_with_markers(text):
            events += parser.feed_ids([token_id])
        events += parser.finish()
        assert coalesce_events(events) == whole
    return whole


def tool(name: str, **properties: str) -> dict:
    """Build an OpenAI function tool whose parameters have the given JSON types."""
    return {"type": "function", "function": {
        "name": name, "description": f"{name} tool",
        "parameters": {"type": "object",
                       "properties": {k: {"type": v} for k, v in properties.items()}}}}

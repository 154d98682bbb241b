"""Replace or append one section of docs/benchmarks.md, leaving the other sections alone."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nMeasured numbers of dsv4; each section names its script, machine and date.\n"


def write_section(path: Path, title: str, body: str) -> None:
    """Write ``## title`` with ``body``; an existing section of that title is replaced."""
    text = path.read_text() if path.exists() else HEADER
    heading = f"## {title}\n"
    section = f"{heading}\n{body.rstrip()}\n"
    if heading in text:
        before, _, rest = text.partition(heading)
        next_heading = rest.find("\n## ")
        after = rest[next_heading + 1:] if next_heading >= 0 else ""
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

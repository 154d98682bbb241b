"""Command-line subcommands of the chat area: ``dsv4 encode`` and ``dsv4 parse``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``encode`` and ``parse``."""
    encode = subparsers.add_parser(
        "encode", help="render chat messages as a DeepSeek-V4 prompt",
        description="Render chat messages as a DeepSeek-V4 prompt and print its text or ids.")
    encode.add_argument(
        "--messages", required=True, type=Path, metavar="FILE",
        help="JSON file with a list of messages, or an object with 'messages' and 'tools' "
             "(the tools then join the first system message)")
    encode.add_argument("--mode", choices=("thinking", "chat"), default="thinking",
                        help="thinking (prompt ends with <think>) or chat (ends with </think>); "
                             "default: thinking")
    encode.add_argument("--effort", default=None, metavar="LEVEL",
                        help="reasoning effort: high or max (family v4), low, high or max "
                             "(family v4-0731); default: none")
    encode.add_argument("--family", default="v4", choices=("v4", "v4-0731"),
                        help="checkpoint family whose effort table applies; default: v4")
    encode.add_argument("--ids", action="store_true",
                        help="print the token ids as a JSON list instead of the text")
    encode.set_defaults(handler=_run_encode)

    parse = subparsers.add_parser(
        "parse", help="parse a DeepSeek-V4 completion read from stdin",
        description="Parse a completion (the text after the prompt, markers kept) read from "
                    "stdin, and print the assistant message as JSON.")
    parse.add_argument("--mode", choices=("thinking", "chat"), default="thinking",
                       help="mode the prompt was encoded in; default: thinking")
    parse.add_argument("--tools", type=Path, default=None, metavar="FILE",
                       help="JSON file with the request's tools list; calls to other names "
                            "become errors (default: names are not checked)")
    parse.set_defaults(handler=_run_parse)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None


def _run_encode(args: argparse.Namespace) -> int:
    from dsv4.chat import encode_messages

    data = _read_json(args.messages)
    tools = None
    if isinstance(data, dict):
        if "messages" not in data:
            raise ValueError(f"{args.messages}: an object needs a 'messages' list "
                             f"(and optionally 'tools')")
        messages, tools = data["messages"], data.get("tools")
    else:
        messages = data
    prompt = encode_messages(messages, tools, mode=args.mode, reasoning_effort=args.effort,
                             family=args.family)
    if args.ids:
        print(json.dumps(prompt.token_ids))
    else:
        sys.stdout.write(prompt.text)
        sys.stdout.flush()
    return 0


def _run_parse(args: argparse.Namespace) -> int:
    from dsv4.chat import parse_completion

    tools = _read_json(args.tools) if args.tools is not None else None
    message = parse_completion(sys.stdin.read(), mode=args.mode, tools=tools)
    print(json.dumps(message.to_dict(), ensure_ascii=False, indent=2))
    return 0

"""The ``dsv4`` command: one subcommand group per area, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines register(subparsers); its subcommands set `handler` on their parser.
_COMMAND_MODULES = (
    "dsv4.cli.model_commands",
    "dsv4.cli.engine_commands",
    "dsv4.cli.chat_commands",
    "dsv4.cli.server_commands",
    "dsv4.cli.sandbox_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4", description="Run and build on DeepSeek-V4 models on your own hardware.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # User-facing failures carry a message that names the value and the fix.
        print(f"dsv4 {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

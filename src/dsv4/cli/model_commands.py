"""Command-line subcommands of the model area: ``init-checkpoint`` and ``validate-checkpoint``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``init-checkpoint`` and ``validate-checkpoint``."""
    init = subparsers.add_parser(
        "init-checkpoint", help="write a random-initialized checkpoint of a config",
        description="Write a checkpoint with random weights in the released DeepSeek-V4 "
                    "layout (safetensors shards, FP8/FP4 weights with UE8M0 scales). The "
                    "same config and seed always give the same files.")
    init.add_argument("--config", required=True, metavar="NAME|PATH",
                      help="preset name (flash, pro, tiny, test-mix, test-window) or a "
                           "config.json / checkpoint directory")
    init.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="output directory; must be missing or empty")
    init.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    init.add_argument("--layers", type=int, metavar="K",
                      help="keep only the first K layers (the MTP block is kept)")
    init.add_argument("--experts", type=int, metavar="E",
                      help="keep only the first E routed experts per layer")
    init.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    init.set_defaults(handler=run_init_checkpoint)

    validate = subparsers.add_parser(
        "validate-checkpoint", help="check a checkpoint's tensors against its config.json",
        description="Check that every tensor of a checkpoint directory has the name, shape "
                    "and dtype its config.json requires, without reading tensor data.")
    validate.add_argument("path", type=Path, metavar="DIR", help="checkpoint directory")
    validate.set_defaults(handler=run_validate_checkpoint)


def run_init_checkpoint(args: argparse.Namespace) -> int:
    from dsv4.config import resolve_config
    from dsv4.model.writer import write_random_checkpoint

    config = resolve_config(args.config)
    try:
        out = write_random_checkpoint(config, args.out, seed=args.seed, num_layers=args.layers,
                                      num_experts=args.experts, progress=not args.no_progress)
    except FileExistsError as error:
        raise ValueError(str(error)) from None  # reported as a usage error, without traceback
    print(f"wrote checkpoint to {out}")
    return 0


def run_validate_checkpoint(args: argparse.Namespace) -> int:
    from dsv4.model.checkpoint import CheckpointReader

    reader = CheckpointReader(args.path)
    reader.validate()
    print(f"{args.path}: {len(reader.names())} tensors match config.json "
          f"({reader.naming} names)")
    return 0

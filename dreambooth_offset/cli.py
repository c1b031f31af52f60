"""Command line: `dreambooth-offset <subcommand> ...`.

Subcommands live next to the code they drive, in each subpackage's `commands.py`; each exposes
`register(subparsers)`, which adds its parser (every flag from its schema in config/) and sets
`func=run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dreambooth_offset.errors import TrainingFailed, UsageError

# Modules that add subcommands, in the order `--help` lists them.
SUBCOMMAND_MODULES = (
    "dreambooth_offset.training.commands",
    "dreambooth_offset.sampling.commands",
    "dreambooth_offset.base_model.commands",
    "dreambooth_offset.webui.commands",
    "dreambooth_offset.experiments.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth-offset", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _quiet_import_noise() -> None:
    """Two warnings every command would print at import, about features this package never uses:
    bitsandbytes' optional 4-bit CPU kernels, and transformers' torchvision image processors (a
    text-to-image trainer loads no CLIP image processor)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    # No network at run time: checkpoints come from local folders or an existing hub cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _quiet_import_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"dreambooth-offset {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingFailed as err:
        print(f"dreambooth-offset {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print(f"dreambooth-offset {args.command}: stopped", file=sys.stderr)
        return 130

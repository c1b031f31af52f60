"""`dreambooth-offset pretrain-base`: its flags are the PretrainCommand schema (config/recipe.py)."""
from __future__ import annotations

import argparse

from dreambooth_offset.config import add_arguments, config_from_args
from dreambooth_offset.config.recipe import PretrainCommand


def register(subparsers) -> None:
    from dreambooth_offset.base_model import pretrain

    p = subparsers.add_parser("pretrain-base", help="Train the small base model the package ships.",
                              description=pretrain.__doc__.splitlines()[0], allow_abbrev=False)
    add_arguments(p, PretrainCommand, config_file=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dreambooth_offset.base_model.pretrain import pretrain

    cfg = config_from_args(args, PretrainCommand)
    if cfg.process.num_threads:
        torch.set_num_threads(cfg.process.num_threads)
    print(f"saved {pretrain(cfg.recipe)}")
    return 0

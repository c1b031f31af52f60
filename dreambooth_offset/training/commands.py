"""`dreambooth-offset train`: its flags are the RunConfig schema (config/run.py)."""
from __future__ import annotations

import argparse

from dreambooth_offset.config import RunConfig, add_arguments, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        allow_abbrev=False,  # `--learning_rat` must be an error, not a silent `--learning_rate`
        help="DreamBooth LoRA fine-tuning with offset noise.",
        description="Defaults < --config TOML file < flags. Writes pytorch_lora_weights.safetensors to --output_dir.",
    )
    add_arguments(p, RunConfig)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dreambooth_offset.training.train import train

    train(config_from_args(args, RunConfig))
    return 0

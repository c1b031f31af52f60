"""`--use_ema`: an exponential moving average of the LoRA weights, with diffusers' `EMAModel`.

The average is over the trainable (LoRA) parameters only. It is what the run validates with and
writes as its output; the raw weights go to `output_dir/raw/`. Checkpoints keep the raw weights
(what the optimizer continues from) and the average in `ema_lora.safetensors`, so a resume is exact.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth_offset.config import OptimConfig
from dreambooth_offset.errors import UsageError

EMA_FILE = "ema_lora.safetensors"


def make_ema(params: list[torch.nn.Parameter], cfg: OptimConfig):
    """diffusers' EMAModel over `params` (decay ramped as (1 + t) / (10 + t) up to --ema_decay), or None."""
    if not cfg.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay)


def save_ema(ema, directory: Path) -> None:
    state = ema.state_dict()
    scalars = {k: v for k, v in state.items() if k != "shadow_params"}
    save_file({f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(state["shadow_params"])},
              directory / EMA_FILE, metadata={"ema": json.dumps(scalars)})


def load_ema(ema, directory: Path) -> None:
    path = directory / EMA_FILE
    if not path.is_file():
        raise UsageError(f"--resume_from_checkpoint {directory}: {EMA_FILE} is missing (was it trained without "
                         "--use_ema?)")
    with safe_open(str(path), "pt") as f:
        scalars = json.loads(f.metadata()["ema"])
        shadow = [f.get_tensor(f"shadow.{i}") for i in range(len(ema.shadow_params))]
    ema.load_state_dict({**scalars, "shadow_params": [s.to(p.device) for s, p in zip(shadow, ema.shadow_params)]})


@contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter], keep: bool = False) -> Iterator[None]:
    """The averaged weights in `params` inside the block (nothing changes when `ema` is None);
    the raw ones are put back after it unless `keep`."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        if not keep:
            ema.restore(params)

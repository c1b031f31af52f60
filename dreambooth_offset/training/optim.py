"""Optimizer and learning-rate schedule factories."""
from __future__ import annotations

import torch

from dreambooth_offset.config import OptimConfig, TrainConfig
from dreambooth_offset.errors import UsageError

# bitsandbytes keeps tensors under `min_8bit_size` elements (default 4096) in fp32. A rank-4 LoRA
# on SD 1.5's 320-wide attention has 4 x 320 = 1280-element matrices, so with the default most
# of a LoRA's optimizer state would silently stay fp32. Blockwise quantisation works on blocks
# of 256, so one block is the smallest sensible size.
MIN_8BIT_SIZE = 256


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW (fused on the CPU), or bitsandbytes AdamW8bit after a one-step probe on the
    parameters' device.

    Never falls back silently: if bitsandbytes is missing or cannot run here, the run stops and
    says to use `--optimizer adamw`.
    """
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    if cfg.optimizer == "adamw":
        # On the CPU the default per-tensor loop costs about 10 times the fused kernel (LoRA means
        # hundreds of small tensors); elsewhere (None) torch picks its own fast path.
        fused = True if params[0].device.type == "cpu" else None
        return torch.optim.AdamW(params, fused=fused, **kwargs)
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library raising anything else
        raise UsageError(
            f"--optimizer adamw8bit needs bitsandbytes, which cannot be imported here ({err}); "
            "install it or use --optimizer adamw"
        ) from None
    try:
        probe = torch.nn.Parameter(torch.zeros(MIN_8BIT_SIZE, device=params[0].device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], min_8bit_size=MIN_8BIT_SIZE).step()
        return bnb.optim.AdamW8bit(params, min_8bit_size=MIN_8BIT_SIZE, **kwargs)
    except Exception as err:  # bitsandbytes raises several types for an unsupported device
        raise UsageError(f"bitsandbytes refused AdamW8bit on this device ({err}); use --optimizer adamw") from None


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, train: TrainConfig, num_processes: int):
    """diffusers' `get_scheduler`; accelerate steps a prepared scheduler once per process, hence the factor."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=train.max_train_steps * num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (moments, quantisation maps, scales), each storage
    counted once: bitsandbytes hands every parameter a reference to one shared quantisation map."""
    storages = {}
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())

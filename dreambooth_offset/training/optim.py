"""Optimizer and learning-rate schedule factories, and the parameter groups they train."""
from __future__ import annotations

import torch

from dreambooth_offset.config import OptimConfig, TrainConfig
from dreambooth_offset.config.sections import parse_step_rules
from dreambooth_offset.errors import UsageError

# bitsandbytes keeps tensors under `min_8bit_size` elements (default 4096) in fp32. A rank-4 LoRA
# on SD 1.5's 320-wide attention has 4 x 320 = 1280-element matrices, so with the default most
# of a LoRA's optimizer state would silently stay fp32. Blockwise quantisation works on blocks
# of 256, so one block is the smallest sensible size.
MIN_8BIT_SIZE = 256


class _Groups(list):
    """Stands in for an optimizer class in peft's `create_loraplus_optimizer`, which builds
    `optimizer_cls(groups, **kwargs)`: keeps peft's LoRA+ parameter groups (A at lr, B at ratio x
    lr) so that they join the other models' groups in one optimizer."""

    def __init__(self, groups, **kwargs):
        super().__init__(g for g in groups if g["params"])


def param_groups(models: list[torch.nn.Module], cfg: OptimConfig) -> list[dict]:
    """The trainable parameters of `models` (the UNet first, then text encoders) as optimizer groups:
    the UNet's at --learning_rate, the text encoders' at --text_encoder_lr (default the same), and
    with --loraplus_lr_ratio each split by peft into A and B matrices."""
    from peft.optimizers import create_loraplus_optimizer

    groups = []
    for i, model in enumerate(models):
        lr = cfg.learning_rate if i == 0 or cfg.text_encoder_lr is None else cfg.text_encoder_lr
        if cfg.loraplus_lr_ratio is None:
            groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": lr})
        else:
            groups += create_loraplus_optimizer(model, _Groups, lr=lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                                loraplus_weight_decay=cfg.adam_weight_decay)
    return [g for g in groups if g["params"]]


def make_optimizer(params: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW (fused on the CPU), bitsandbytes AdamW8bit after a one-step probe on the
    parameters' device, or Prodigy; `params` is a list of parameters or of groups (`param_groups`).

    Never falls back silently: if bitsandbytes (or prodigyopt) is missing or cannot run here, the
    run stops and says what to use instead.
    """
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    if cfg.optimizer == "adamw":
        # On the CPU the default per-tensor loop costs about 10 times the fused kernel (LoRA means
        # hundreds of small tensors); elsewhere (None) torch picks its own fast path.
        fused = True if first.device.type == "cpu" else None
        return torch.optim.AdamW(params, fused=fused, **kwargs)
    if cfg.optimizer == "prodigy":
        return make_prodigy(params, cfg, kwargs)
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library raising anything else
        raise UsageError(
            f"--optimizer adamw8bit needs bitsandbytes, which cannot be imported here ({err}); "
            "install it or use --optimizer adamw"
        ) from None
    try:
        probe = torch.nn.Parameter(torch.zeros(MIN_8BIT_SIZE, device=first.device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], min_8bit_size=MIN_8BIT_SIZE).step()
        return bnb.optim.AdamW8bit(params, min_8bit_size=MIN_8BIT_SIZE, **kwargs)
    except Exception as err:  # bitsandbytes raises several types for an unsupported device
        raise UsageError(f"bitsandbytes refused AdamW8bit on this device ({err}); use --optimizer adamw") from None


def make_prodigy(params: list, cfg: OptimConfig, kwargs: dict) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, the `prodigyopt` package), with the flags of diffusers'
    SDXL DreamBooth script. Its learning rate multiplies the step size it estimates (`d`), so the
    convention is 1.0; a value far from it gets a warning, as in diffusers' script."""
    import sys

    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UsageError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
    if not 0.1 <= cfg.learning_rate <= 10:
        print(f"warning: --learning_rate {cfg.learning_rate} with --optimizer prodigy: Prodigy estimates the step "
              "size itself and the learning rate scales it, so the usual value is 1.0", file=sys.stderr)
    return Prodigy(params, beta3=cfg.prodigy_beta3, decouple=cfg.prodigy_decouple,
                   use_bias_correction=cfg.prodigy_use_bias_correction,
                   safeguard_warmup=cfg.prodigy_safeguard_warmup, **kwargs)


def scale_step_rules(rules: str, factor: int) -> str:
    """The rules with every step times `factor` (the scheduler's steps per optimizer step)."""
    pairs, last = parse_step_rules(rules)
    return ",".join([*(f"{m!r}:{step * factor}" for m, step in pairs), repr(last)])


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, train: TrainConfig, num_processes: int):
    """diffusers' `get_scheduler`; accelerate steps a prepared scheduler once per process, hence the factor."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        step_rules=cfg.lr_step_rules and scale_step_rules(cfg.lr_step_rules, num_processes),
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

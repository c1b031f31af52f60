"""Everything before the first training step: input checks, accelerate, models, LoRA, optimizer, data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_offset import checkpoint, noise_auto
from dreambooth_offset.batches import BatchSource
from dreambooth_offset.config import RunConfig
from dreambooth_offset.data import find_images, load_resized, read_captions
from dreambooth_offset.errors import UsageError
from dreambooth_offset.lora import add_adapters, trainable_parameters
from dreambooth_offset.models import SDParts, load_parts, training_scheduler
from dreambooth_offset.optim import make_lr_scheduler, make_optimizer


def check_inputs(cfg: RunConfig) -> None:
    """Everything that can be checked before a model loads; raises UsageError naming the culprit."""
    if not cfg.data.instance_data_dir:
        raise UsageError("--instance_data_dir is required")
    if not cfg.data.instance_prompt:
        raise UsageError("--instance_prompt is required")
    captions = cfg.data.caption_extension
    find_images(cfg.data.instance_data_dir, "instance_data_dir", caption_extension=captions)
    if cfg.data.with_prior_preservation and Path(cfg.data.class_data_dir).is_dir():
        find_images(cfg.data.class_data_dir, "class_data_dir", allow_empty=True, caption_extension=captions)
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--output_dir {out}: not writable ({err.strerror})") from None
    checkpoint.resolve_resume(out, cfg.train.resume_from_checkpoint)


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.train.output_dir)
    # accelerate keeps its state (mixed precision ...) per process; a second train() in the same
    # process (the experiment, tests) must be free to choose another precision. The process
    # group (PartialState) stays.
    AcceleratorState._reset_state()
    try:
        return Accelerator(
            # With no GPU, cpu=True is what lets torchrun/accelerate launch run MULTI_CPU (gloo).
            cpu=not torch.accelerator.is_available(),
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
    except ValueError as err:
        raise UsageError(f"--mixed_precision {cfg.train.mixed_precision}: {err}") from None


@dataclass
class Prepared:
    """A run ready to train: models wrapped by accelerate, and `cfg` with 'auto' values resolved."""

    cfg: RunConfig
    accelerator: object
    parts: SDParts  # the frozen parts; noise_scheduler is the training one
    unet: torch.nn.Module  # with LoRA, prepared by accelerate
    text_encoder: torch.nn.Module | None  # with LoRA when it trains, else None
    params: list[torch.nn.Parameter]  # the trainable (LoRA) parameters
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    batches: BatchSource
    auto: noise_auto.AutoOffset | None  # what noise_offset 'auto' chose, if asked


def prepare(cfg: RunConfig, accelerator) -> Prepared:
    from diffusers.training_utils import cast_training_params

    from dreambooth_offset import prior

    out = Path(cfg.train.output_dir)
    parts = load_parts(cfg.model)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    paths = {"instance": find_images(cfg.data.instance_data_dir, "instance_data_dir",
                                     caption_extension=cfg.data.caption_extension)}
    prompts = {"instance": cfg.data.instance_prompt, "class": cfg.data.class_prompt}
    if cfg.data.with_prior_preservation:  # the base samples its class images with its own scheduler
        paths["class"] = prior.ensure_class_images(parts, cfg, accelerator)
    images = {src: load_resized(p, cfg.data.resolution) for src, p in paths.items()}
    captions = {src: read_captions(p, cfg.data.caption_extension, prompts[src]) for src, p in paths.items()}
    if cfg.noise.zero_terminal_snr or cfg.loss.prediction_type is not None:
        parts = parts._replace(noise_scheduler=training_scheduler(
            parts.noise_scheduler.config, cfg.noise.zero_terminal_snr, cfg.loss.prediction_type))

    unet, vae = parts.unet, parts.vae
    text_encoder = parts.text_encoder if cfg.adapter.train_text_encoder else None
    for module in (unet, vae, parts.text_encoder):
        module.to(accelerator.device)
        if weight_dtype != torch.float32:  # casting fp32 to fp32 would only make diffusers warn
            module.to(dtype=weight_dtype)
    cfg, auto, channel_means = noise_auto.resolve_auto_offset(cfg, vae, parts.noise_scheduler, images)
    if auto is not None:
        accelerator.print(noise_auto.describe(auto))
        if accelerator.is_main_process:
            noise_auto.write_record(out / noise_auto.RECORD_NAME, auto, channel_means)
    add_adapters(unet, text_encoder, cfg.adapter)
    trained = [m for m in (unet, text_encoder) if m is not None]
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights train in fp32 under fp16/bf16
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()

    params = trainable_parameters(*trained)
    optimizer = make_optimizer(params, cfg.optim)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.train, accelerator.num_processes)
    if text_encoder is not None:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    checkpoint.register_lora_hooks(accelerator, unet, text_encoder)

    batches = BatchSource(images, captions, cfg.data, parts.tokenizer, parts.text_encoder, vae, cfg.adapter.train_text_encoder,
                          cfg.train.seed, accelerator.process_index, accelerator.num_processes)
    return Prepared(cfg, accelerator, parts, unet, text_encoder, params, optimizer, lr_scheduler, batches, auto)

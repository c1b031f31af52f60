"""Everything before the first training step: accelerate, models, the data (read by
training/inputs.py), buckets, LoRA, optimizer, and the step to start from."""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_offset.config import RunConfig
from dreambooth_offset.config.run import CONFIG_NAME
from dreambooth_offset.data.buckets import assign_buckets, bucket_info, bucket_table
from dreambooth_offset.data.summary import RECORD_NAME as DATASET_RECORD
from dreambooth_offset.data.summary import write_record as write_dataset_record
from dreambooth_offset.errors import UsageError
from dreambooth_offset.noise.auto import AutoOffset, describe
from dreambooth_offset.training import checkpoint
from dreambooth_offset.training.auto_offset import RECORD_NAME, resolve_auto_offset, write_record
from dreambooth_offset.training.batches import BatchSource
from dreambooth_offset.training.family import DEFAULT_NOISE_OFFSET, SDXL
from dreambooth_offset.training.inputs import check_inputs, load_data
from dreambooth_offset.training.lora import add_adapters, trainable_parameters
from dreambooth_offset.training.models import SDParts, load_parts, native_resolution, training_scheduler
from dreambooth_offset.training.ema import load_ema, make_ema
from dreambooth_offset.training.network_weights import load_network_weights
from dreambooth_offset.training.offload import park
from dreambooth_offset.training.optim import make_lr_scheduler, make_optimizer, param_groups
from dreambooth_offset.training.validation_loss import HeldOut, held_out_set, split_held_out

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from dreambooth_offset.compat import reset_accelerator_state

    out = Path(cfg.train.output_dir)
    if cfg.train.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report_to wandb needs the wandb package (pip install wandb, then wandb login); "
                         "or use --report_to tensorboard")
    reset_accelerator_state()  # a second train() in this process may choose another precision
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
class Run:
    """A run ready to train: what the loop reads and steps."""

    config: RunConfig  # as saved beside the LoRA: the resolution and noise_offset 'auto' resolved
    accelerator: object
    generator: torch.Generator  # the run's one generator: noise, timesteps, posterior draws, crops, flips
    parts: SDParts  # the frozen parts; noise_scheduler is the training one
    unet: torch.nn.Module  # with LoRA, prepared by accelerate
    text_encoder: torch.nn.Module | None  # with LoRA when it trains, else None
    text_encoder_2: torch.nn.Module | None  # SDXL's second encoder, likewise
    params: list[torch.nn.Parameter]  # the trainable (LoRA) parameters
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    batches: BatchSource
    auto: AutoOffset | None  # what noise_offset 'auto' chose, if asked
    first_step: int  # 0, or the step of the checkpoint resumed from
    started: float  # Unix time the run started
    ema: object | None = None  # --use_ema: diffusers' EMAModel over `params` (training/ema.py)
    held_out: HeldOut | None = None  # --validation_split: the fixed validation-loss inputs
    dataset: dict | None = None  # kohya's dataset metadata (data/summary.py), written as dataset.json
    parked: tuple[torch.nn.Module, ...] = ()  # frozen parts no step calls, in CPU memory while training (offload.py)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.train.output_dir)

    @property
    def trained(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        """Each text encoder as training runs it: the prepared one where it trains, else the frozen one."""
        trained = (self.text_encoder, self.text_encoder_2)
        return tuple(t if t is not None else frozen for t, frozen in zip(trained, self.parts.text_encoders))


def prepare(cfg: RunConfig, resources: ExitStack | None = None) -> Run:
    """The run ready to train. With `resources` (the caller's ExitStack, closed when the run ends)
    the main process holds the output folder's lock (guards.output_lock) until then."""
    from accelerate.utils import set_seed

    from dreambooth_offset.training.guards import output_lock

    started = time.time()
    inputs = check_inputs(cfg)
    cfg = inputs.config
    accelerator = make_accelerator(cfg)
    if resources is not None and accelerator.is_main_process:
        resources.enter_context(output_lock(Path(cfg.train.output_dir)))
    set_seed(cfg.train.seed)  # peft's LoRA init and dropout use torch's global RNG
    generator = torch.Generator().manual_seed(cfg.train.seed + 1_000_003 * accelerator.process_index)
    parts = load_parts(cfg.model)
    config = resolve_for_model(cfg, parts)
    images, captions, sizes, repeats, policies, dataset = load_data(config, parts, accelerator, inputs.subsets)
    per_image = (images, captions, sizes, repeats, policies)
    buckets = None
    if config.data.enable_bucket:
        names = [p for _, ps in inputs.subsets["instance"] for p in ps]
        buckets = {"instance": assign_buckets(sizes["instance"], names, config.data)}
        accelerator.print(bucket_table(Counter(buckets["instance"])))
        dataset["bucket_info"] = bucket_info(buckets["instance"], sizes["instance"], repeats["instance"])
        dataset.update({k: getattr(config.data, k) for k in ("enable_bucket", "min_bucket_reso", "max_bucket_reso",
                                                             "bucket_no_upscale")})  # kohya's ss_* names
        per_image += (buckets,)
    held = split_held_out(per_image, config.validation.validation_split, config.train.seed)
    if config.noise.zero_terminal_snr or config.loss.prediction_type is not None:  # after the class images
        parts = parts._replace(noise_scheduler=training_scheduler(
            parts.noise_scheduler.config, config.noise.zero_terminal_snr, config.loss.prediction_type))
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        module.to(accelerator.device)
        upcast = module is parts.vae and parts.vae.config.get("force_upcast", False)  # SDXL's VAE overflows in fp16
        if config.train.mixed_precision != "no" and not upcast:  # casting fp32 to fp32 would only make diffusers warn
            module.to(dtype=WEIGHT_DTYPES[config.train.mixed_precision])
    rgb = {src: imgs.rgb() for src, imgs in images.items()}  # without a --masked_loss mask
    config, auto, channel_means = resolve_auto_offset(config, parts.vae, parts.noise_scheduler, rgb)
    if auto is not None:
        accelerator.print(describe(auto))
        if accelerator.is_main_process:
            write_record(Path(config.train.output_dir) / RECORD_NAME, auto, channel_means)
    unet, text_encoders, params, optimizer, lr_scheduler = make_trainable(config, parts, accelerator)
    batches = BatchSource(images, captions, config.data, parts, any(t is not None for t in text_encoders),
                          config.train.seed, accelerator.process_index, accelerator.num_processes,
                          sizes if parts.family == SDXL else None, repeats, policies,
                          None if buckets is None else buckets["instance"])
    run = Run(config, accelerator, generator, parts, unet, *text_encoders, params, optimizer, lr_scheduler, batches,
              auto, 0, started, make_ema(params, config.optim),
              None if held is None else held_out_set(held[0].rgb(), *held[1:3], parts, config), dataset)
    run.first_step = start_step(run, inputs.resume)
    run.parked = batches.idle_parts(parts)
    park(run.parked)  # on a CPU-only machine a no-op
    return run


def resolve_for_model(cfg: RunConfig, parts: SDParts) -> RunConfig:
    """The config with what the model decides filled in: the resolution (the model's native one
    unless given), the noise offset (the family's default unless given) and, for SDXL, whether its
    second text encoder trains."""
    resolution = cfg.data.resolution or native_resolution(parts.unet.config, parts.vae.config)
    noise = cfg.noise
    if noise.noise_offset is None:
        noise = dataclasses.replace(noise, noise_offset=DEFAULT_NOISE_OFFSET[parts.family])
    steps = parts.noise_scheduler.config.num_train_timesteps
    if (cfg.loss.max_timestep or 0) > steps or cfg.loss.min_timestep >= steps:
        raise UsageError(f"min_timestep / max_timestep = {cfg.loss.min_timestep} / {cfg.loss.max_timestep}: the "
                         f"model's scheduler has timesteps 0..{steps - 1} (max_timestep may be {steps})")
    adapter = cfg.adapter
    if parts.family == SDXL and adapter.train_text_encoder_2 is None:
        adapter = dataclasses.replace(adapter, train_text_encoder_2=adapter.train_text_encoder)
    elif parts.family != SDXL and adapter.train_text_encoder_2:
        raise UsageError(f"--train_text_encoder_2: {cfg.model.pretrained_model_name_or_path} has one text encoder "
                         "(SDXL has two); use --train_text_encoder")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=resolution), noise=noise,
                               adapter=adapter)


def make_trainable(cfg: RunConfig, parts: SDParts, accelerator):
    """LoRA on the UNet (and text encoders), fp32 LoRA weights, optimizer and schedule, all
    prepared by accelerate: (unet, (text_encoder or None, text_encoder_2 or None), params,
    optimizer, lr_scheduler)."""
    from diffusers.training_utils import cast_training_params

    unet = parts.unet
    text_encoders = (parts.text_encoder if cfg.adapter.train_text_encoder else None,
                     parts.text_encoder_2 if cfg.adapter.train_text_encoder_2 else None)
    add_adapters(unet, cfg.adapter, *text_encoders)
    trained = [m for m in (unet, *text_encoders) if m is not None]
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights train in fp32 under fp16/bf16
    if cfg.adapter.network_weights:
        components = {"unet": unet, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]}
        n = load_network_weights(cfg.adapter.network_weights, cfg.adapter,
                                 {k: m for k, m in components.items() if m is not None})
        accelerator.print(f"started from {n} LoRA modules of {cfg.adapter.network_weights}")
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in trained[1:]:
            encoder.gradient_checkpointing_enable()
    if cfg.train.torch_compile:  # in place: the module, its state dict and peft's view of it stay the same
        unet.compile(backend=cfg.train.dynamo_backend)
    params = trainable_parameters(*trained)
    optimizer = make_optimizer(param_groups(trained, cfg.optim), cfg.optim)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.train, accelerator.num_processes)
    prepared = iter(accelerator.prepare(*trained, optimizer, lr_scheduler))
    unet = next(prepared)
    text_encoders = tuple(None if t is None else next(prepared) for t in text_encoders)
    optimizer, lr_scheduler = next(prepared), next(prepared)
    checkpoint.register_lora_hooks(accelerator, unet, *text_encoders)
    return unet, text_encoders, params, optimizer, lr_scheduler


def start_step(run: Run, resume: Path | None) -> int:
    """Load the checkpoint to resume from (if any), save the resolved config, start the trackers;
    the step to start from."""
    accelerator, first_step = run.accelerator, 0
    if resume is not None:
        checkpoint.check_resumable(resume, run.config)  # again, with what the model resolved
        first_step = checkpoint.load_checkpoint(accelerator, resume, run.generator)
        if run.ema is not None:
            load_ema(run.ema, resume)
        accelerator.print(f"resumed from {resume} at step {first_step}")
    elif run.config.train.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {run.output_dir} yet: starting from step 0")
    if accelerator.is_main_process:
        run.config.save_json(run.output_dir / CONFIG_NAME)
        if run.dataset is not None:
            write_dataset_record(run.output_dir / DATASET_RECORD, run.dataset)
        loggable = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run.config.to_dict().items()}
        accelerator.init_trackers("dreambooth-offset", config=loggable)  # tensorboard's hparams: scalars, strings
    return first_step

"""The training loop: DreamBooth LoRA with offset noise, under accelerate. The `train` subcommand."""
from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_offset import checkpoint, config, noise_auto
from dreambooth_offset.batches import Batch
from dreambooth_offset.config import RunConfig
from dreambooth_offset.errors import TrainingDiverged
from dreambooth_offset.lora import save_lora
from dreambooth_offset.models import encode_prompts
from dreambooth_offset.noise import perturb_input_noise, sample_noise, training_progress
from dreambooth_offset.objective import (
    Loss,
    dreambooth_loss,
    huber_threshold,
    min_snr_weights,
    training_target,
)
from dreambooth_offset.setup import check_inputs, make_accelerator, prepare

CONFIG_NAME = "training_config.json"


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps run in this call (after a resume: the remaining ones)
    seconds: float
    lora_path: Path
    unet: torch.nn.Module  # the trained UNet with its LoRA, unwrapped from accelerate
    text_encoder: torch.nn.Module  # with LoRA when --train_text_encoder, else the frozen base
    parts: object  # the loaded SDParts (tokenizer, vae, scheduler ...) for sampling after training
    steps_per_second: float  # the loop's rate after its first step (setup and warm-up left out)
    config: RunConfig  # the run's config as saved: noise_offset 'auto' resolved to its value


def train_step(unet, text_encoder, noise_scheduler, batch: Batch, cfg: RunConfig, generator: torch.Generator,
               step: int = 0) -> Loss:
    """Noise the latents at random timesteps and regress the UNet on the scheduler's target.

    `step` (0-based optimizer step) drives noise_offset_schedule. Input perturbation changes the
    UNet's input only; the target is built from the clean `noise`."""
    latents = batch.latents
    noise = sample_noise(latents, cfg.noise, generator, training_progress(step, cfg.train.max_train_steps))
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, perturb_input_noise(noise, cfg.noise, generator), timesteps)
    context = batch.encoder_hidden_states
    if context is None:
        context = encode_prompts(text_encoder, batch.input_ids)
    model_pred = unet(noisy_latents, timesteps, context.to(latents.device)).sample
    target = training_target(noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(noise_scheduler, timesteps, cfg.loss.snr_gamma) if cfg.loss.snr_gamma else None
    huber_c = huber_threshold(noise_scheduler, timesteps, cfg.loss) if cfg.loss.loss_type != "l2" else None
    return dreambooth_loss(model_pred, target, batch.num_instance, cfg.data.prior_loss_weight, weights,
                           cfg.loss.loss_type, huber_c)


def write_lora_files(directory: Path, unet, text_encoder, cfg: RunConfig, noise_scheduler, step: int,
                     started_at: float, extra_metadata: dict | None = None) -> Path:
    """The diffusers file, plus `<output_name>.safetensors` for the WebUIs when the base is SD 1.x/2.x.

    Its metadata holds every noise and loss setting (`config.training_settings`, kohya's `ss_*`
    names where kohya has one) plus `extra_metadata` (e.g. the noise_offset auto record)."""
    from dreambooth_offset import webui
    from dreambooth_offset.lora import lora_state_dicts

    path = save_lora(directory, unet, text_encoder)
    base = webui.base_for(unet.config.cross_attention_dim, noise_scheduler.config.prediction_type)
    if base is not None:
        name = cfg.train.output_name or Path(cfg.train.output_dir).resolve().name
        metadata = webui.training_metadata(
            base=base, rank=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, output_name=name, started_at=started_at,
            saved_at=time.time(), steps=step, learning_rate=cfg.optim.learning_rate, optimizer=cfg.optim.optimizer,
            seed=cfg.train.seed, resolution=cfg.data.resolution, mixed_precision=cfg.train.mixed_precision,
            noise={**config.training_settings(cfg), "prediction_type": noise_scheduler.config.prediction_type,
                   **(extra_metadata or {})},
            base_model_name=cfg.model.pretrained_model_name_or_path,
        )
        webui.save_webui_lora(directory / f"{name}.safetensors", *lora_state_dicts(unet, text_encoder),
                              lora_alpha=cfg.adapter.alpha, rank=cfg.adapter.rank, metadata=metadata)
    return path


def train(cfg: RunConfig, progress_bar: dict | None = None) -> TrainResult:
    """Run the configured training; `progress_bar` holds extra tqdm arguments for the step bar
    (a `desc` naming the run, a `position` when several runs share a terminal)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from dreambooth_offset import sample

    started = time.time()
    check_inputs(cfg)
    accelerator = make_accelerator(cfg)
    out = Path(cfg.train.output_dir)
    set_seed(cfg.train.seed)  # peft's LoRA init and dropout use torch's global RNG
    # The run's generator: noise, timesteps, posterior draws, crops and flips. One per process.
    generator = torch.Generator().manual_seed(cfg.train.seed + 1_000_003 * accelerator.process_index)

    run = prepare(cfg, accelerator)
    cfg, parts, unet, text_encoder = run.cfg, run.parts, run.unet, run.text_encoder
    optimizer, lr_scheduler, params, batches = run.optimizer, run.lr_scheduler, run.params, run.batches

    def save_weights(folder: Path, step: int) -> Path:
        return write_lora_files(folder, accelerator.unwrap_model(unet),
                                text_encoder and accelerator.unwrap_model(text_encoder), cfg, parts.noise_scheduler,
                                step, started, noise_auto.metadata(run.auto))

    first_step = 0
    resume = checkpoint.resolve_resume(out, cfg.train.resume_from_checkpoint)
    if resume is not None:
        first_step = checkpoint.load_checkpoint(accelerator, resume, generator)
        accelerator.print(f"resumed from {resume} at step {first_step}")
    elif cfg.train.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {out} yet: starting from step 0")
    if accelerator.is_main_process:
        cfg.save_json(out / CONFIG_NAME)
        accelerator.init_trackers("dreambooth-offset", config=_loggable(cfg.to_dict()))

    accum = cfg.train.gradient_accumulation_steps
    bar = tqdm(range(first_step, cfg.train.max_train_steps), initial=first_step, total=cfg.train.max_train_steps,
               **{"desc": "train", **(progress_bar or {})}, disable=not accelerator.is_local_main_process)
    first_done = None
    trained_models = [m for m in (unet, text_encoder) if m is not None]
    for model in trained_models:
        model.train()  # LoRA dropout on; frozen modules have no dropout/batch-norm of their own
    for step in bar:
        for micro in range(accum):
            with accelerator.accumulate(*trained_models):
                batch = batches(step * accum + micro, generator)
                loss = train_step(unet, text_encoder, parts.noise_scheduler, batch, cfg, generator, step)
                total = loss.total.item()  # one host sync per micro-step, reused by the log below
                if not math.isfinite(total):
                    last = checkpoint.list_checkpoints(out)
                    raise TrainingDiverged(
                        f"loss became {total} at step {step + 1}; stopped without writing the LoRA. "
                        f"Last good checkpoint: {last[-1] if last else 'none'}"
                    )
                accelerator.backward(loss.total)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        done = step + 1
        first_done = first_done or time.perf_counter()
        logs = {"loss": total, "loss_instance": loss.instance.item(), "lr": lr_scheduler.get_last_lr()[0]}
        if loss.prior is not None:
            logs["loss_prior"] = loss.prior.item()
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        accelerator.log(logs, step=done)
        if cfg.train.checkpointing_steps and done % cfg.train.checkpointing_steps == 0 and done < cfg.train.max_train_steps:
            checkpoint.save_checkpoint(accelerator, out, done, generator, cfg.train.checkpoints_total_limit,
                                       functools.partial(save_weights, step=done))
        if cfg.validation.validation_prompt and (done % cfg.validation.validation_steps == 0 or done == cfg.train.max_train_steps):
            if accelerator.is_main_process:
                sample.run_validation(accelerator, parts, unet, text_encoder, cfg, done)
                for model in trained_models:
                    model.train()
            accelerator.wait_for_everyone()

    loop_end = time.perf_counter()
    accelerator.wait_for_everyone()
    lora_path = out / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        lora_path = save_weights(out, cfg.train.max_train_steps)
    accelerator.end_training()
    result = TrainResult(cfg.train.max_train_steps - first_step, time.time() - started, lora_path,
                         accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder or parts.text_encoder),
                         parts, (cfg.train.max_train_steps - first_step - 1) / max(loop_end - first_done, 1e-9), cfg)
    logs = f"; logs: {out / 'logs'}" if cfg.train.report_to != "none" else ""
    accelerator.print(f"trained {result.steps} steps in {result.seconds:.1f} s; LoRA: {result.lora_path}; "
                      f"config: {out / CONFIG_NAME}{logs}")
    return result


def _loggable(flat: dict) -> dict:
    """tensorboard's hparams take only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        allow_abbrev=False,  # `--learning_rat` must be an error, not a silent `--learning_rate`
        help="DreamBooth LoRA fine-tuning with offset noise.",
        description="Defaults < --config TOML file < flags. Writes pytorch_lora_weights.safetensors to --output_dir.",
    )
    config.add_arguments(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    cfg = config.config_from_args(args)
    try:
        train(cfg)
    except TrainingDiverged as err:
        import sys

        print(f"dreambooth-offset train: {err}", file=sys.stderr)
        return 1
    return 0

"""The training loop: DreamBooth LoRA with offset noise, under accelerate.

batch -> step -> backward -> optimizer (step.py), then one call each for the log, checkpoints
and validation. Everything before the first step is in prepare.py.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_offset.config import RunConfig
from dreambooth_offset.config.run import CONFIG_NAME
from dreambooth_offset.errors import TrainingInterrupted, writing
from dreambooth_offset.noise.objective import Loss
from dreambooth_offset.training import checkpoint
from dreambooth_offset.training.ema import ema_weights, save_ema
from dreambooth_offset.training.lora import weight_name
from dreambooth_offset.training.offload import brought_back, unpark
from dreambooth_offset.training.outputs import write_lora_files
from dreambooth_offset.training.guards import StopRequest, stop_on_signal
from dreambooth_offset.training.prepare import Run, prepare
from dreambooth_offset.training.step import optimizer_step


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps run in this call (after a resume: the remaining ones)
    seconds: float
    lora_path: Path
    unet: torch.nn.Module  # the trained UNet with its LoRA (--use_ema: the average), unwrapped from accelerate
    text_encoders: tuple[torch.nn.Module, ...]  # each with LoRA where it trained, else the frozen base
    parts: object  # the loaded SDParts (tokenizer, vae, scheduler ...) for sampling after training
    steps_per_second: float  # the loop's rate after its first step (setup and warm-up left out)
    config: RunConfig  # the run's config as saved: the resolution and noise_offset 'auto' resolved


def train(cfg: RunConfig, progress_bar: dict | None = None) -> TrainResult:
    """Run the configured training; `progress_bar` holds extra tqdm arguments for the step bar
    (a `desc` naming the run, a `position` when several runs share a terminal)."""
    from tqdm.auto import tqdm

    with ExitStack() as resources:  # the output folder's lock and the signal handlers, for the whole run
        stop = resources.enter_context(stop_on_signal())
        run = prepare(cfg, resources)
        total_steps = run.config.train.max_train_steps
        bar = tqdm(range(run.first_step, total_steps), initial=run.first_step, total=total_steps,
                   **{"desc": "train", **(progress_bar or {})}, disable=not run.accelerator.is_local_main_process)
        first_done, loop_start = None, time.perf_counter()
        for model in run.trained:
            model.train()  # LoRA dropout on; frozen modules have no dropout/batch-norm of their own
        for step in bar:
            loss, total = optimizer_step(run, step)
            if run.ema is not None:
                run.ema.step(run.params)
            first_done = first_done or time.perf_counter()
            done = step + 1
            log_step(run, bar, loss, total, done)
            if stop_requested(run, stop) and done < total_steps:
                raise interrupted(run, done, stop.signum)
            if every(run.config.train.checkpointing_steps, done) and done < total_steps:
                save_checkpoint(run, done)
            if run.config.validation.validation_prompt and (every(run.config.validation.validation_steps, done)
                                                            or done == total_steps):
                validate(run, done)
            if run.held_out is not None and (every(validation_loss_steps(run.config), done) or done == total_steps):
                log_validation_loss(run, done)
        return finish(run, loop_start, first_done, time.perf_counter())


def every(interval: int, done: int) -> bool:
    """Whether `done` steps complete an interval of `interval` steps (0: never)."""
    return bool(interval) and done % interval == 0


def log_step(run: Run, bar, loss: Loss, total: float, done: int) -> None:
    logs = {"loss": total, "loss_instance": loss.instance.item(), "lr": run.lr_scheduler.get_last_lr()[0]}
    if loss.prior is not None:
        logs["loss_prior"] = loss.prior.item()
    if loss.preservation is not None:
        logs["loss_preservation"] = loss.preservation.item()
    bar.set_postfix(loss=f"{total:.4f}")
    run.accelerator.log(logs, step=done)


def save_checkpoint(run: Run, step: int) -> Path:
    """Everything needed to continue at `step`: accelerate's state, the LoRA files, the generator,
    the resolved config (a resume with other settings is refused)."""
    with writing(run.output_dir), \
            checkpoint.staged(run.accelerator, run.output_dir, step, run.config.train.checkpoints_total_limit) as folder:
        run.accelerator.save_state(str(folder))
        if run.accelerator.is_main_process:
            write_lora_files(folder, run, step)
            run.config.save_json(folder / CONFIG_NAME)
            if run.ema is not None:
                save_ema(run.ema, folder)
        checkpoint.save_trainer_state(folder, step, run.generator, run.accelerator.process_index)
    return folder.with_name(f"checkpoint-{step}")


def stop_requested(run: Run, stop: StopRequest) -> bool:
    """Whether a process got SIGINT/SIGTERM; under several processes all of them agree, so that
    they stop after the same step and write one checkpoint together."""
    if run.accelerator.num_processes == 1:
        return stop.signum is not None
    flag = torch.tensor([float(stop.signum is not None)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item() > 0)


def interrupted(run: Run, step: int, signum: int | None) -> TrainingInterrupted:
    """Checkpoint after the finished `step` and say how to resume."""
    import signal as signals

    folder = save_checkpoint(run, step)
    name = signals.Signals(signum).name if signum else "another process's signal"
    return TrainingInterrupted(f"stopped by {name} after step {step} of {run.config.train.max_train_steps}; "
                               f"checkpoint: {folder}. Resume with the same command and "
                               "--resume_from_checkpoint latest", signum or signals.SIGTERM)


def validate(run: Run, step: int) -> None:
    from dreambooth_offset.sampling.validation import run_validation

    if run.accelerator.is_main_process:
        # --use_ema: what the run will write is what it samples
        with ema_weights(run.ema, run.params), brought_back(run.parked, run.accelerator.device):
            run_validation(run, step)
        for model in run.trained:
            model.train()
    run.accelerator.wait_for_everyone()


def validation_loss_steps(cfg: RunConfig) -> int:
    return cfg.validation.validate_every_n_steps or cfg.validation.validation_steps


def log_validation_loss(run: Run, step: int) -> None:
    """The held-out images' loss (with the EMA weights under --use_ema), logged and printed."""
    from tqdm.auto import tqdm

    from dreambooth_offset.training.validation_loss import validation_loss

    with ema_weights(run.ema, run.params), brought_back(run.parked, run.accelerator.device):
        value = validation_loss(run, run.held_out)
    run.accelerator.log({"validation/loss": value}, step=step)
    if run.accelerator.is_main_process:
        tqdm.write(f"step {step} validation loss ({run.held_out.latents.shape[0]} held-out rows): {value:.5f}")


def finish(run: Run, loop_start: float, first_done: float | None, loop_end: float) -> TrainResult:
    """Write the final LoRA files (main process), close the trackers, report (the first step apart:
    it holds the warm-up, and torch.compile's compilation under --torch_compile)."""
    accelerator, cfg, out = run.accelerator, run.config, run.output_dir
    accelerator.wait_for_everyone()
    lora_path = out / weight_name(cfg.adapter.network_type)
    if accelerator.is_main_process:
        with writing(out):
            if run.ema is not None:  # the raw weights beside the average, which is the output
                write_lora_files(out / "raw", run, cfg.train.max_train_steps, final=True)
            with ema_weights(run.ema, run.params, keep=True):
                lora_path = write_lora_files(out, run, cfg.train.max_train_steps, final=True)
    accelerator.end_training()
    unpark(run.parked, accelerator.device)  # the caller may sample with the parts (experiments/runs.py)
    steps = cfg.train.max_train_steps - run.first_step
    rate = (steps - 1) / max(loop_end - (first_done or loop_end), 1e-9)
    result = TrainResult(steps, time.time() - run.started, lora_path, accelerator.unwrap_model(run.unet),
                         tuple(accelerator.unwrap_model(t) for t in run.encoders), run.parts, rate, cfg)
    logs = f"; logs: {out / 'logs'}" if cfg.train.report_to != "none" else ""
    compiled = " with torch.compile's compilation" if cfg.train.torch_compile else ""
    then = f", then {rate:.2f} steps/s" if steps > 1 else ""
    first = f" (first step {(first_done or loop_end) - loop_start:.1f} s{compiled}{then})" if steps else ""
    accelerator.print(f"trained {result.steps} steps in {result.seconds:.1f} s{first}; "
                      f"LoRA: {result.lora_path}; config: {out / CONFIG_NAME}{logs}")
    return result

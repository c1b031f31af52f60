"""One training step: the math of a step (`train_step`) and one optimizer step over the
accumulated micro-batches (`optimizer_step`)."""
from __future__ import annotations

import math

import torch

from dreambooth_offset.config import RunConfig
from dreambooth_offset.errors import TrainingDiverged
from dreambooth_offset.noise.noise import perturb_input_noise, sample_noise, training_progress
from dreambooth_offset.noise.objective import (Loss, dreambooth_loss, huber_threshold, min_snr_weights,
                                              per_sample_loss, training_target)
from dreambooth_offset.training.batches import Batch
from dreambooth_offset.training.checkpoint import list_checkpoints
from dreambooth_offset.training.family import Conditioning, encode_prompts, predict
from dreambooth_offset.training.lora import adapters_off


def train_step(unet, text_encoders, noise_scheduler, batch: Batch, cfg: RunConfig, generator: torch.Generator,
               step: int = 0) -> Loss:
    """Noise the latents at random timesteps and regress the UNet on the scheduler's target.

    `step` (0-based optimizer step) drives noise_offset_schedule. Input perturbation changes the
    UNet's input only; the target is built from the clean `noise` (docs/science.md, 'Offset noise
    and its variants'). `text_encoders` encode the prompts when the batch has no cached conditioning."""
    latents = batch.latents
    noise = sample_noise(latents, cfg.noise, generator, training_progress(step, cfg.train.max_train_steps))
    high = cfg.loss.max_timestep or noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(cfg.loss.min_timestep, high, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, perturb_input_noise(noise, cfg.noise, generator), timesteps)
    cond = batch.conditioning
    if cond is None:
        cond = encode_prompts(text_encoders, batch.input_ids)
    model_pred = predict(unet, noisy_latents, timesteps, cond.to(latents.device), batch.time_ids)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    n = batch.num_instance
    if cfg.data.prior_preservation == "prediction" and n < latents.shape[0]:
        context = None if batch.conditioning is None else batch.conditioning.rows(slice(n, None))
        times = None if batch.time_ids is None else batch.time_ids[n:]
        target = torch.cat([target[:n], base_prediction(unet, text_encoders, noisy_latents[n:], timesteps[n:], context,
                                                         batch.input_ids[n:], times).to(target)])
    weights = min_snr_weights(noise_scheduler, timesteps, cfg.loss.snr_gamma) if cfg.loss.snr_gamma else None
    huber_c = huber_threshold(noise_scheduler, timesteps, cfg.loss) if cfg.loss.loss_type != "l2" else None
    mask = None if batch.mask is None else batch.mask.to(latents.device)
    loss = dreambooth_loss(model_pred, target, n, cfg.data.prior_loss_weight, weights, cfg.loss.loss_type, huber_c,
                           mask)
    if batch.twin_ids is None:
        return loss
    kept = output_preservation_loss(unet, text_encoders, batch, noisy_latents[:n], timesteps[:n],
                                    None if weights is None else weights[:n], cfg.loss.loss_type,
                                    None if huber_c is None else huber_c[:n])
    return loss._replace(total=loss.total + cfg.data.output_preservation_weight * kept, preservation=kept)


def output_preservation_loss(unet, text_encoders, batch: Batch, noisy_latents, timesteps, weights, loss_type: str,
                             huber_c):
    """The instance rows' noisy latents under their twin captions (`batch.twin_ids`): the LoRA's
    prediction against the base's (every LoRA off) at exactly that input, averaged as the instance
    loss is (docs/dark-and-bright.md, "Output preservation")."""
    n = noisy_latents.shape[0]
    times = None if batch.time_ids is None else batch.time_ids[:n]
    cond = batch.twin_conditioning
    if cond is None:
        cond = encode_prompts(text_encoders, batch.twin_ids)
    pred = predict(unet, noisy_latents, timesteps, cond.to(noisy_latents.device), times)
    target = base_prediction(unet, text_encoders, noisy_latents, timesteps, batch.twin_conditioning, batch.twin_ids,
                             times)
    losses = per_sample_loss(pred, target.to(pred), loss_type, huber_c)
    return (losses if weights is None else losses * weights.to(losses)).mean()


@torch.no_grad()
def base_prediction(unet, text_encoders, noisy_latents, timesteps, cond: Conditioning | None, input_ids, times):
    """What the base model (every LoRA off) predicts at `noisy_latents` for the prompts `input_ids`
    (`cond`: their frozen encoders' output, when there is one): the target of
    `prior_preservation = 'prediction'` and of output preservation."""
    with adapters_off(unet, *text_encoders):
        cond = encode_prompts(text_encoders, input_ids) if cond is None else cond
        return predict(unet, noisy_latents, timesteps, cond.to(noisy_latents.device), times)


def optimizer_step(run, step: int) -> tuple[Loss, float]:
    """Optimizer step `step` (0-based) of a prepared run (training/prepare.py): its micro-batches'
    forward and backward, clipping, the update. Returns the last micro-batch's loss and its value.

    Raises TrainingDiverged (naming the step and the last good checkpoint) on a NaN or inf loss,
    before it reaches the weights."""
    cfg, accelerator = run.config, run.accelerator
    accum = cfg.train.gradient_accumulation_steps
    for micro in range(accum):
        with accelerator.accumulate(*run.trained):
            batch = run.batches(step * accum + micro, run.generator)
            loss = train_step(run.unet, run.encoders, run.parts.noise_scheduler, batch, cfg, run.generator, step)
            total = loss.total.item()  # one host sync per micro-step, reused by the log
            if not math.isfinite(total):
                last = list_checkpoints(run.output_dir)
                raise TrainingDiverged(f"loss became {total} at step {step + 1}; stopped without writing the LoRA. "
                                       f"Last good checkpoint: {last[-1] if last else 'none'}")
            accelerator.backward(loss.total)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    return loss, total

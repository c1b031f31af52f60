"""The regression target and the loss. Pure functions; the scheduler owns the schedule.
Formulas: docs/science.md, "Prediction targets", "Min-SNR weighting" and "Loss functions"."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.config import LossConfig


def training_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet regresses on, by the scheduler's `prediction_type`: the noise (epsilon), or
    v = a_t * eps - s_t * x0 (docs/science.md, "Prediction targets")."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")


def min_snr_weights(scheduler, timesteps: Tensor, gamma: float) -> Tensor:
    """Per-sample loss weights (B,) of Min-SNR-gamma (Hang et al. 2023), by `prediction_type`.

    docs/science.md, "Min-SNR weighting". SNR = abar / (1 - abar) (diffusers' `compute_snr`). epsilon: min(SNR, g) / SNR; v-prediction:
    min(SNR, g) / (SNR + 1). At SNR = 0 (the last step under zero terminal SNR) the epsilon form is
    0/0; its limit is 1, used there. Both are finite for every timestep.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")


def huber_threshold(scheduler, timesteps: Tensor, cfg: LossConfig) -> Tensor:
    """Per-sample Huber threshold c (B,), as kohya's `get_huber_threshold_if_needed` (docs/science.md,
    "Loss functions").

    constant: c; exponential: c^(t / T); snr: (1 - c) / (1 + sigma_t)^2 + c with
    sigma_t = sqrt((1 - abar) / abar) (-> c at abar = 0).
    """
    c = cfg.huber_c
    t = timesteps.float()
    if cfg.huber_schedule == "constant":
        return torch.full_like(t, c)
    if cfg.huber_schedule == "exponential":
        return c ** (t / scheduler.config.num_train_timesteps)
    if cfg.huber_schedule == "snr":
        abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1.0 - abar) / abar).sqrt()
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    raise ValueError(f"unknown huber_schedule {cfg.huber_schedule!r}")


def elementwise_loss(model_pred: Tensor, target: Tensor, loss_type: str = "l2", huber_c: Tensor | None = None) -> Tensor:
    """The loss of every element, shaped like `model_pred`, in fp32.

    l2: (p - y)^2; huber: 2c (sqrt((p - y)^2 + c^2) - c); smooth_l1: 2 (sqrt((p - y)^2 + c^2) - c)
    (kohya's `conditional_loss` forms; `huber_c` is per sample; docs/science.md, 'Loss functions').
    They are computed as 2 d^2 / (sqrt(d^2 + c^2) + c), the same value without the cancellation of
    `sqrt(d^2 + c^2) - c` when |d| << c (there float32 keeps only a few digits of the difference,
    and which ones depends on how the CPU's vector unit rounds the square root).
    """
    diff2 = (model_pred.float() - target.float()) ** 2
    if loss_type == "l2":
        return diff2
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs huber_c")
        c = huber_c.float().view(-1, *([1] * (diff2.ndim - 1)))
        loss = 2.0 * diff2 / (torch.sqrt(diff2 + c**2) + c)
        return c * loss if loss_type == "huber" else loss
    raise ValueError(f"unknown loss_type {loss_type!r}: use 'l2', 'huber' or 'smooth_l1'")


def per_sample_loss(model_pred: Tensor, target: Tensor, loss_type: str = "l2", huber_c: Tensor | None = None,
                    mask: Tensor | None = None) -> Tensor:
    """`elementwise_loss` (times `mask`, broadcast over channels) averaged over all but the batch
    dimension: (B,)."""
    loss = elementwise_loss(model_pred, target, loss_type, huber_c)
    if mask is not None:
        loss = loss * mask.to(loss)
    return loss.mean(dim=tuple(range(1, loss.ndim)))


class Loss(NamedTuple):
    total: Tensor
    instance: Tensor
    prior: Tensor | None
    preservation: Tensor | None = None  # output preservation (training/step.py), already in `total`


def dreambooth_loss(model_pred: Tensor, target: Tensor, num_instance: int, prior_loss_weight: float,
                    weights: Tensor | None = None, loss_type: str = "l2", huber_c: Tensor | None = None,
                    mask: Tensor | None = None) -> Loss:
    """Loss on the instance rows plus `prior_loss_weight` * loss on the class rows after them.

    DreamBooth (Ruiz et al. 2022) prior preservation (docs/science.md, "Loss functions"): a batch
    holds `num_instance` instance examples first, then class examples (none without prior
    preservation). `weights` (B,) scale each sample's loss (Min-SNR); `loss_type` / `huber_c` as in
    `elementwise_loss`. `mask` (B, 1, h, w) weights each latent pixel (masked loss, as kohya:
    the mean still counts the masked-out elements, as zeros). Plain MSE when none is given.
    """
    if weights is None:  # every element of the rows counts once: plain MSE for l2
        losses = elementwise_loss(model_pred, target, loss_type, huber_c)
        losses = losses if mask is None else losses * mask.to(losses)
    else:
        losses = per_sample_loss(model_pred, target, loss_type, huber_c, mask)
        losses = losses * weights.to(losses)
    instance = losses[:num_instance].mean()
    prior = losses[num_instance:].mean() if losses.shape[0] > num_instance else None
    if prior is None:
        return Loss(instance, instance, None)
    return Loss(instance + prior_loss_weight * prior, instance, prior)


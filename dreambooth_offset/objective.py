"""The regression target and the loss. Pure functions; the scheduler owns the schedule."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def training_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet regresses on, by the scheduler's `prediction_type`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")


class Loss(NamedTuple):
    total: Tensor
    instance: Tensor
    prior: Tensor | None


def dreambooth_loss(model_pred: Tensor, target: Tensor, num_instance: int, prior_loss_weight: float) -> Loss:
    """MSE on the instance rows plus `prior_loss_weight` * MSE on the class rows after them.

    DreamBooth (Ruiz et al. 2022) prior preservation: a batch holds `num_instance` instance
    examples first, then class examples (none without prior preservation).
    """
    pred = model_pred.float()
    target = target.float()
    instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if pred.shape[0] == num_instance:
        return Loss(instance, instance, None)
    prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    return Loss(instance + prior_loss_weight * prior, instance, prior)


def is_finite(loss: Tensor) -> bool:
    return bool(torch.isfinite(loss).all())

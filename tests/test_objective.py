import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_offset.objective import dreambooth_loss, training_target


def _scheduler(prediction_type):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def test_epsilon_target_is_the_noise():
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert torch.equal(training_target(_scheduler("epsilon"), latents, noise, t), noise)


def test_v_target_is_a_eps_minus_s_x0():
    sched = _scheduler("v_prediction")
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    assert torch.allclose(training_target(sched, latents, noise, t), expected, atol=1e-6)


def test_unknown_prediction_type_raises():
    sched = _scheduler("epsilon")
    sched.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="sample"):
        training_target(sched, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_loss_splits_instance_and_prior_rows():
    pred = torch.zeros(4, 1)
    target = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    loss = dreambooth_loss(pred, target, num_instance=2, prior_loss_weight=0.5)
    assert loss.instance.item() == 1.0 and loss.prior.item() == 4.0
    assert loss.total.item() == 1.0 + 0.5 * 4.0
    only = dreambooth_loss(pred[:2], target[:2], num_instance=2, prior_loss_weight=0.5)
    assert only.prior is None and only.total.item() == 1.0

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_offset.config import LossConfig
from dreambooth_offset.training.models import training_scheduler
from dreambooth_offset.noise.objective import (
    dreambooth_loss, huber_threshold, min_snr_weights, per_sample_loss, training_target,
)


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


# --- zero terminal SNR, min-SNR-gamma, Huber (issue 5) ------------------------------------------

ALL_T = torch.arange(1000)


def test_zero_terminal_snr_schedule_ends_in_pure_noise_and_keeps_the_start():
    base = _scheduler("epsilon")
    ztsnr = training_scheduler(base.config, zero_terminal_snr=True, prediction_type="v_prediction")
    assert ztsnr.alphas_cumprod[-1].item() == 0.0
    assert base.alphas_cumprod[-1].item() > 4e-3  # SD's own: a_T^2 = 0.00466
    torch.testing.assert_close(ztsnr.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-6, atol=0)
    assert torch.all(ztsnr.alphas_cumprod[1:] < ztsnr.alphas_cumprod[:-1])  # still decreasing
    assert ztsnr.config.prediction_type == "v_prediction" and ztsnr.config.rescale_betas_zero_snr
    # at t = T the v target is -x0: the model must say what the image is
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([999, 999])
    torch.testing.assert_close(training_target(ztsnr, latents, noise, t), -latents)
    assert training_scheduler(base.config).alphas_cumprod.equal(base.alphas_cumprod)  # no overrides: same


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_min_snr_weights_are_finite_everywhere(prediction_type, zero_terminal_snr):
    sched = training_scheduler(_scheduler("epsilon").config, zero_terminal_snr, prediction_type)
    w = min_snr_weights(sched, ALL_T, 5.0)
    assert w.shape == (1000,) and torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    abar = sched.alphas_cumprod
    snr = abar / (1 - abar)
    t = torch.tensor([0, 500, 900])
    expected = snr[t].clamp(max=5.0) / (snr[t] if prediction_type == "epsilon" else snr[t] + 1)
    torch.testing.assert_close(w[t], expected.float(), rtol=1e-5, atol=1e-7)
    if zero_terminal_snr:  # SNR = 0 at t = T: v weight 0/1 = 0, epsilon weight 0/0 -> its limit 1
        assert w[-1].item() == (1.0 if prediction_type == "epsilon" else 0.0)


def test_huber_thresholds_follow_kohya_and_stay_finite_at_snr_zero():
    sched = training_scheduler(_scheduler("epsilon").config, zero_terminal_snr=True, prediction_type="v_prediction")
    c = 0.1
    t = torch.tensor([0, 999])
    assert torch.equal(huber_threshold(sched, t, LossConfig(huber_schedule="constant", huber_c=c)), torch.full((2,), c))
    exp = huber_threshold(sched, t, LossConfig(huber_schedule="exponential", huber_c=c))
    torch.testing.assert_close(exp, torch.tensor([1.0, c ** 0.999]))
    snr = huber_threshold(sched, ALL_T, LossConfig(huber_schedule="snr", huber_c=c))
    assert torch.isfinite(snr).all() and snr[-1].item() == pytest.approx(c) and snr[0].item() > 0.9


def test_huber_and_smooth_l1_limits():
    """Huber 2c(sqrt(d^2 + c^2) - c): ~d^2 for |d| << c, ~2c|d| for |d| >> c; smooth_l1 is it / c."""
    c = torch.tensor([0.1])
    small, large = torch.full((1, 4), 1e-3), torch.full((1, 4), 100.0)
    zero = torch.zeros(1, 4)
    assert per_sample_loss(small, zero, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)
    assert per_sample_loss(large, zero, "huber", c).item() == pytest.approx(2 * 0.1 * 100, rel=1e-2)
    assert per_sample_loss(small, zero, "smooth_l1", c).item() == pytest.approx(1e-6 / 0.1, rel=1e-3)
    assert per_sample_loss(large, zero, "l2").item() == pytest.approx(1e4)
    with pytest.raises(ValueError, match="huber_c"):
        per_sample_loss(small, zero, "huber")


def test_weighted_loss_scales_each_sample_and_keeps_the_split():
    pred = torch.zeros(4, 1, 2, 2)
    target = torch.cat([torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 2.0)])
    weights = torch.tensor([1.0, 0.0, 0.5, 0.5])
    loss = dreambooth_loss(pred, target, num_instance=2, prior_loss_weight=0.5, weights=weights)
    assert loss.instance.item() == pytest.approx(0.5) and loss.prior.item() == pytest.approx(2.0)
    assert loss.total.item() == pytest.approx(0.5 + 0.5 * 2.0)
    plain = dreambooth_loss(pred, target, 2, 0.5)
    ones = dreambooth_loss(pred, target, 2, 0.5, weights=torch.ones(4))
    torch.testing.assert_close(plain.total, ones.total)

import dataclasses
import math

import pytest
import torch

from dreambooth_offset.config import NoiseConfig
from dreambooth_offset.noise.noise import (
    offset_noise, perturb_input_noise, pyramid_noise, sample_noise, scheduled_offset, training_progress,
)


def test_zero_offset_is_exactly_randn_for_the_same_generator():
    latents = torch.zeros(3, 4, 8, 8)
    expected = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    got = sample_noise(latents, NoiseConfig(noise_offset=0.0), torch.Generator().manual_seed(7))
    assert torch.equal(got, expected)


def test_shape_dtype_determinism_and_no_mutation():
    latents = torch.ones(2, 4, 6, 5, dtype=torch.float64)
    a = offset_noise(latents, 0.1, torch.Generator().manual_seed(1))
    b = offset_noise(latents, 0.1, torch.Generator().manual_seed(1))
    assert a.shape == latents.shape and a.dtype == latents.dtype
    assert torch.equal(a, b)
    assert torch.equal(latents, torch.ones_like(latents))


def test_offset_is_one_shift_per_sample_and_channel():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    latents = torch.zeros(2, 3, 4, 4)
    base = offset_noise(latents, 0.0, g1)
    shifted = offset_noise(latents, 0.5, g2)
    diff = shifted - base
    # the difference is constant over H, W within each (b, c)
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff[:, :, 0, 0].abs().min() > 0


def test_channel_mean_variance_grows_by_offset_squared():
    """Var(mean_hw) = 1/N + o^2. With M (b, c) pairs the sample variance has relative standard
    error sqrt(2/(M-1)); the test allows five of those."""
    o, h, w = 0.3, 8, 8
    n = h * w
    latents = torch.zeros(4096, 4, h, w)
    means = offset_noise(latents, o, torch.Generator().manual_seed(0)).mean(dim=(2, 3)).flatten()
    m = means.numel()
    expected = 1 / n + o**2
    tolerance = 5 * math.sqrt(2 / (m - 1)) * expected
    assert abs(means.var().item() - expected) < tolerance
    without = offset_noise(latents, 0.0, torch.Generator().manual_seed(0)).mean(dim=(2, 3)).flatten().var().item()
    assert abs(without - 1 / n) < 5 * math.sqrt(2 / (m - 1)) / n


# --- the noise options (issue 5) ---------------------------------------------------------------


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


OPTION_CONFIGS = {
    "random_strength": NoiseConfig(noise_offset=0.2, noise_offset_random_strength=True),
    "adaptive": NoiseConfig(noise_offset=0.1, adaptive_noise_scale=0.05),
    "probability": NoiseConfig(noise_offset=0.2, noise_offset_probability=0.5),
    "variance_preserving": NoiseConfig(noise_offset=0.2, noise_offset_variance_preserving=True),
    "linear_schedule": NoiseConfig(noise_offset=0.2, noise_offset_schedule="linear", noise_offset_end=0.0),
    "pyramid": NoiseConfig(noise_offset=0.0, multires_noise_iterations=6, multires_noise_discount=0.3),
}


@pytest.mark.parametrize("name", OPTION_CONFIGS)
def test_every_option_keeps_shape_dtype_determinism_and_inputs(name):
    cfg = OPTION_CONFIGS[name]
    latents = torch.randn(3, 4, 8, 6, generator=_g(9), dtype=torch.float64)
    before = latents.clone()
    a = sample_noise(latents, cfg, _g(1), progress=0.3)
    b = sample_noise(latents, cfg, _g(1), progress=0.3)
    assert a.shape == latents.shape and a.dtype == latents.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.equal(latents, before)
    assert not torch.equal(a, sample_noise(latents, cfg, _g(2), progress=0.3))


def test_offset_config_is_offset_noise_draw_for_draw():
    latents = torch.zeros(2, 4, 8, 8)
    g = _g(3)
    guttenberg = torch.randn((2, 4, 8, 8), generator=g) + 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    assert torch.equal(sample_noise(latents, NoiseConfig(noise_offset=0.1), _g(3)), guttenberg)
    assert torch.equal(offset_noise(latents, 0.1, _g(3)), guttenberg)


def test_options_follow_their_formula_draw_for_draw():
    """Rebuild each option's noise from the same generator stream: per-pixel randn, then the
    per-batch draws, then the per-(sample, channel) randn."""
    latents = torch.randn(2, 4, 8, 8, generator=_g(5)) + torch.tensor([0.0, 1.0, -2.0, 0.5]).view(1, 4, 1, 1)
    shape, bc = (2, 4, 8, 8), (2, 4, 1, 1)

    g = _g(0)
    base, u, z = torch.randn(shape, generator=g), torch.rand((), generator=g), torch.randn(bc, generator=g)
    cfg = NoiseConfig(noise_offset=0.2, noise_offset_random_strength=True)
    assert torch.equal(sample_noise(latents, cfg, _g(0)), base + (0.2 * u) * z)

    g = _g(0)
    base, z = torch.randn(shape, generator=g), torch.randn(bc, generator=g)
    k = 0.05
    strength = (0.1 + k * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    got = sample_noise(latents, NoiseConfig(noise_offset=0.1, adaptive_noise_scale=k), _g(0))
    torch.testing.assert_close(got, base + strength * z, rtol=0, atol=1e-6)

    # A negative k clamps to zero offset: channels with |mean| >= o / |k| get plain randn.
    got = sample_noise(latents, NoiseConfig(noise_offset=0.1, adaptive_noise_scale=-1.0), _g(0))
    assert torch.equal(got[:, 2], base[:, 2])

    g = _g(0)
    base, z = torch.randn(shape, generator=g), torch.randn(bc, generator=g)
    got = sample_noise(latents, NoiseConfig(noise_offset=0.3, noise_offset_variance_preserving=True), _g(0))
    torch.testing.assert_close(got, (base + 0.3 * z) / math.sqrt(1 + 0.3**2), rtol=0, atol=1e-6)


def test_probability_zero_is_randn_and_one_is_plain_offset():
    latents = torch.zeros(2, 4, 8, 8)
    never = NoiseConfig(noise_offset=0.2, noise_offset_probability=0.0)
    assert torch.equal(sample_noise(latents, never, _g(4)), torch.randn(latents.shape, generator=_g(4)))
    always = NoiseConfig(noise_offset=0.2, noise_offset_probability=1.0)
    assert torch.equal(sample_noise(latents, always, _g(4)), offset_noise(latents, 0.2, _g(4)))


def test_probability_applies_the_offset_to_that_fraction_of_batches():
    """o = 1 makes an offset batch unmistakable (channel-mean variance ~1 against 1/N); the applied
    fraction of K batches has standard error sqrt(p (1 - p) / K); allow five."""
    p, k = 0.3, 1000
    cfg = NoiseConfig(noise_offset=1.0, noise_offset_probability=p)
    g, latents = _g(0), torch.zeros(16, 4, 4, 4)
    applied = sum(sample_noise(latents, cfg, g).mean(dim=(2, 3)).var().item() > 0.3 for _ in range(k))
    assert abs(applied / k - p) < 5 * math.sqrt(p * (1 - p) / k)


def test_random_strength_channel_mean_variance_is_one_over_n_plus_o2_over_3():
    """E[U^2] = 1/3, so Var(mean_hw) = 1/N + o^2/3. U is shared by a batch, so batches are the
    independent units: the tolerance is five standard errors of the mean of the per-batch
    second moments."""
    o, n, k = 0.5, 16, 3000
    cfg = NoiseConfig(noise_offset=o, noise_offset_random_strength=True)
    g, latents = _g(0), torch.zeros(8, 4, 4, 4)
    second = torch.stack([sample_noise(latents, cfg, g).mean(dim=(2, 3)).pow(2).mean() for _ in range(k)])
    expected = 1 / n + o**2 / 3
    assert abs(second.mean().item() - expected) < 5 * second.std().item() / math.sqrt(k)


def test_variance_preserving_keeps_per_pixel_variance_one():
    """Per pixel: Var = 1 (instead of 1 + o^2); per channel mean: (1/N + o^2)/(1 + o^2). The
    per-pixel estimate's standard error: sqrt(2/(M N) + 2 (o^2/(1+o^2))^2 / M) over M (b, c)
    groups of N pixels sharing one shift; the channel-mean one: sqrt(2/(M-1)) relative."""
    o, h, w = 0.3, 8, 8
    n = h * w
    latents = torch.zeros(4096, 4, h, w)
    m = latents.shape[0] * latents.shape[1]
    vp = sample_noise(latents, NoiseConfig(noise_offset=o, noise_offset_variance_preserving=True), _g(0))
    plain = sample_noise(latents, NoiseConfig(noise_offset=o), _g(0))
    pixel_se = math.sqrt(2 / (m * n) + 2 * (o**2 / (1 + o**2)) ** 2 / m)
    assert abs(vp.var().item() - 1.0) < 5 * pixel_se
    assert abs(plain.var().item() - (1 + o**2)) < 5 * pixel_se * (1 + o**2)
    expected = (1 / n + o**2) / (1 + o**2)
    assert abs(vp.mean(dim=(2, 3)).var().item() - expected) < 5 * math.sqrt(2 / (m - 1)) * expected


def test_pyramid_noise_is_unit_std_and_spatially_correlated():
    """White noise has lag-1 correlation 0 with standard error 1/sqrt(pairs); pyramid noise's
    upsampled low levels correlate neighbours. Allow five standard errors either way."""
    latents = torch.zeros(16, 4, 32, 32)
    pyr = pyramid_noise(latents, 6, 0.3, _g(0))
    white = sample_noise(latents, NoiseConfig(noise_offset=0.0), _g(0))

    def lag1(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item(), a.numel()

    assert abs(pyr.std().item() - 1.0) < 1e-5
    r_pyr, pairs = lag1(pyr)
    r_white, _ = lag1(white)
    se = 1 / math.sqrt(pairs)
    assert abs(r_white) < 5 * se
    assert r_pyr > 5 * se
    # stops once a side reaches 1, whatever the iteration count
    tiny = pyramid_noise(torch.zeros(2, 4, 4, 4), 100, 0.9, _g(0))
    assert torch.isfinite(tiny).all() and tiny.shape == (2, 4, 4, 4)


def test_pyramid_noise_replaces_offset_noise_in_sample_noise():
    latents = torch.zeros(2, 4, 16, 16)
    cfg = NoiseConfig(noise_offset=0.0, multires_noise_iterations=4, multires_noise_discount=0.5)
    assert torch.equal(sample_noise(latents, cfg, _g(7)), pyramid_noise(latents, 4, 0.5, _g(7)))


def test_offset_schedules():
    lin = NoiseConfig(noise_offset=0.2, noise_offset_schedule="linear", noise_offset_end=0.0)
    cos = dataclasses.replace(lin, noise_offset_schedule="cosine")
    assert scheduled_offset(NoiseConfig(noise_offset=0.2), 0.7) == 0.2
    assert [scheduled_offset(lin, p) for p in (0.0, 0.25, 1.0)] == pytest.approx([0.2, 0.15, 0.0])
    assert [scheduled_offset(cos, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.2, 0.1, 0.0])
    values = [scheduled_offset(cos, p / 10) for p in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert training_progress(0, 10) == 0.0 and training_progress(9, 10) == 1.0 and training_progress(0, 1) == 0.0
    # at the end of a schedule to 0 the noise is exactly randn again
    latents = torch.zeros(2, 4, 8, 8)
    assert torch.equal(sample_noise(latents, lin, _g(3), progress=1.0), torch.randn(latents.shape, generator=_g(3)))
    with pytest.raises(ValueError, match="auto"):
        scheduled_offset(NoiseConfig(noise_offset="auto"), 0.0)


def test_input_perturbation_adds_gamma_noise_and_leaves_the_noise_alone():
    """Var(perturbed - noise) = g^2; relative standard error sqrt(2/(n-1))."""
    noise = torch.randn(64, 4, 16, 16, generator=_g(1))
    before = noise.clone()
    g = 0.1
    assert perturb_input_noise(noise, NoiseConfig(), _g(0)) is noise  # off by default
    perturbed = perturb_input_noise(noise, NoiseConfig(ip_noise_gamma=g), _g(0))
    assert torch.equal(noise, before)
    torch.testing.assert_close(perturbed, noise + g * torch.randn(noise.shape, generator=_g(0)))
    diff = (perturbed - noise).flatten()
    assert abs(diff.var().item() - g**2) < 5 * math.sqrt(2 / (diff.numel() - 1)) * g**2
    gen = _g(0)
    u = torch.rand((), generator=gen)
    scaled = perturb_input_noise(noise, NoiseConfig(ip_noise_gamma=g, ip_noise_gamma_random_strength=True), _g(0))
    torch.testing.assert_close(scaled, noise + (g * u) * torch.randn(noise.shape, generator=gen))

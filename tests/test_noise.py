import math

import torch

from dreambooth_offset.config import NoiseConfig
from dreambooth_offset.noise import offset_noise, sample_noise


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

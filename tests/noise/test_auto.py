"""`--noise_offset auto`: the formula (noise/auto.py) and the measurement of a run's images (training/auto_offset.py)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from dreambooth_offset.config import load_config
from dreambooth_offset.noise.auto import AUTO_CAP, auto_offset, leak_gap
from dreambooth_offset.training.auto_offset import latent_channel_means, resolve_auto_offset

# SD 1.x: scaled_linear 0.00085 -> 0.012 over 1000 steps; docs/science.md, "The leak".
SD = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
A_T, S_T = SD.alphas_cumprod[-1].sqrt().item(), (1 - SD.alphas_cumprod[-1]).sqrt().item()


# --- noise_offset auto ---------------------------------------------------------------------------

def test_auto_offset_formula_matches_the_science_table():
    """docs/science.md, "The leak": m = 1 (a black image) at 64 x 64: z = 4.38 without offset, 0.68 at 0.1."""
    n = 64 * 64
    assert leak_gap(1.0, n, A_T, S_T, 0.0) == pytest.approx(4.38, abs=0.01)
    assert leak_gap(1.0, n, A_T, S_T, 0.1) == pytest.approx(0.68, abs=0.01)
    black = auto_offset(torch.tensor([[-1.0, 0.2, 0.1, -0.3]]), n, A_T, S_T)
    assert black.worst_channel_mean == -1.0 and black.z_before == pytest.approx(4.38, abs=0.01)
    assert black.z_after == pytest.approx(1.0) and not black.capped
    assert black.offset == pytest.approx(((A_T / S_T) ** 2 - 1 / n) ** 0.5)  # 0.0666
    # the smallest such o: a hair less leaves z above 1
    assert leak_gap(1.0, n, A_T, S_T, black.offset * 0.99) > 1.0
    grey = auto_offset(torch.tensor([[0.05, -0.02, 0.03, 0.0]]), n, A_T, S_T)
    assert grey.offset == 0.0 and grey.z_after < 1.0 < black.z_before
    # the gap grows with N, so does the chosen offset
    assert auto_offset(torch.tensor([1.0]), 128 * 128, A_T, S_T).offset > black.offset
    assert auto_offset(torch.tensor([1.0]), 8 * 8, A_T, S_T).offset == 0.0  # z = 0.55 already


def test_auto_offset_is_zero_when_the_means_match_the_inference_start():
    """Latent means at the level of the inference start's own spread (1/sqrt(N)) or under zero
    terminal SNR (a_T = 0): nothing to close."""
    n = 64 * 64
    start_like = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) / n**0.5
    assert auto_offset(start_like, n, A_T, S_T).offset == 0.0
    ztsnr = auto_offset(torch.tensor([3.0]), n, 0.0, 1.0)
    assert ztsnr.offset == 0.0 and ztsnr.z_before == 0.0


def test_auto_offset_caps():
    extreme = auto_offset(torch.tensor([10.0]), 64 * 64, A_T, S_T)
    assert extreme.offset == AUTO_CAP and extreme.capped and extreme.z_after > 1.0
    assert auto_offset(torch.tensor([10.0]), 64 * 64, A_T, S_T, cap=1.0).offset == pytest.approx(0.684, abs=1e-3)


class PoolVAE(torch.nn.Module):
    """A stand-in VAE whose posterior mean is the pixels average-pooled by 2 (plus a zero fourth
    channel): latent channel means are the image's own mean colour in [-1, 1]."""

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)
    dtype, device = torch.float32, torch.device("cpu")

    def encode(self, pixels):
        mean = F.avg_pool2d(pixels, 2)
        mean = torch.cat([mean, torch.zeros_like(mean[:, :1])], dim=1)
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -20)], 1)))


def _solid(value, size=64):
    return torch.full((3, size, size), value, dtype=torch.uint8)


def test_auto_measures_the_images_and_picks_more_for_black_than_grey():
    vae, res = PoolVAE(), 64  # latents 32 x 32: N = 1024, where SD's schedule leaks (z = 2.19 at m = 1)
    means, n = latent_channel_means(vae, [_solid(0), _solid(128)], res)
    assert n == 32 * 32
    torch.testing.assert_close(means[0], torch.tensor([-1.0, -1.0, -1.0, 0.0]))
    base = load_config(None, {"noise_offset": "auto", "resolution": res, "noise_offset_random_strength": True})
    black_cfg, black, _ = resolve_auto_offset(base, vae, SD, {"instance": [_solid(0)]})
    grey_cfg, grey, _ = resolve_auto_offset(base, vae, SD, {"instance": [_solid(128)]})
    assert black.offset > 0.05 and black.z_before == pytest.approx(2.19, abs=0.01) and black.z_after == pytest.approx(1.0)
    assert grey.offset == 0.0 and grey.z_before < 0.01
    assert black_cfg.noise.noise_offset == black.offset and black_cfg.noise.noise_offset_random_strength
    # resolved to 0: the offset modifiers have nothing to modify and are dropped from the config
    assert grey_cfg.noise.noise_offset == 0.0 and not grey_cfg.noise.noise_offset_random_strength
    # class images count too: a white class image is as extreme as a black instance image
    both, mixed, _ = resolve_auto_offset(base, vae, SD, {"instance": [_solid(128)], "class": [_solid(255)]})
    assert mixed.offset == pytest.approx(black.offset) and mixed.worst_channel_mean == pytest.approx(1.0)
    same, none, _ = resolve_auto_offset(load_config(None, {"noise_offset": 0.05}), vae, SD, {"instance": [_solid(0)]})
    assert none is None and same.noise.noise_offset == 0.05

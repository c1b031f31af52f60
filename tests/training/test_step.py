"""train_step: the math of one step (training/step.py)."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_offset.config import load_config
from dreambooth_offset.training.models import training_scheduler

SD = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# --- train_step: input perturbation moves the input, never the target ------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_train_step_perturbs_the_input_and_regresses_on_the_clean_noise(prediction_type):
    from dreambooth_offset.training.batches import Batch
    from dreambooth_offset.training.step import train_step

    seen = {}

    class Probe(torch.nn.Module):  # a UNet that records its input and predicts 0
        def forward(self, sample, timesteps, context):
            seen["sample"], seen["timesteps"] = sample, timesteps
            return SimpleNamespace(sample=torch.zeros_like(sample))

    sched = training_scheduler(SD.config, prediction_type=prediction_type)
    cfg = load_config(None, {"noise_offset": 0.0, "ip_noise_gamma": 0.5, "max_train_steps": 1})
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents, torch.zeros(2, 77, dtype=torch.long), torch.zeros(2, 77, 8), 2)
    loss = train_step(Probe(), None, sched, batch, cfg, torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(0)  # the same stream: noise, timesteps, then the perturbation
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    extra = torch.randn(latents.shape, generator=g)
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["sample"], sched.add_noise(latents, noise + 0.5 * extra, timesteps))
    clean_target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss.total, clean_target.pow(2).mean())

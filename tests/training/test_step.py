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
    from dreambooth_offset.training.family import Conditioning
    from dreambooth_offset.training.step import train_step

    seen = {}

    class Probe(torch.nn.Module):  # a UNet that records its input and predicts 0
        def forward(self, sample, timesteps, context, added_cond_kwargs=None):
            seen["sample"], seen["timesteps"] = sample, timesteps
            return SimpleNamespace(sample=torch.zeros_like(sample))

    sched = training_scheduler(SD.config, prediction_type=prediction_type)
    cfg = load_config(None, {"noise_offset": 0.0, "ip_noise_gamma": 0.5, "max_train_steps": 1})
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents, torch.zeros(2, 77, dtype=torch.long), Conditioning(torch.zeros(2, 77, 8)), 2)
    loss = train_step(Probe(), None, sched, batch, cfg, torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(0)  # the same stream: noise, timesteps, then the perturbation
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    extra = torch.randn(latents.shape, generator=g)
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["sample"], sched.add_noise(latents, noise + 0.5 * extra, timesteps))
    clean_target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss.total, clean_target.pow(2).mean())


def _prepared(tiny_model, instance_dir, tmp_path, **extra):
    from dreambooth_offset.training.prepare import prepare
    from tests.tiny import overrides, write_images

    classes = write_images(tmp_path / "class", [(10, 10, 10), (240, 240, 240)])
    return prepare(overrides(tiny_model, instance_dir, tmp_path / "out", with_prior_preservation=True,
                             class_data_dir=str(classes), class_prompt="a photo of dog", num_class_images=2,
                             optimizer="adamw", **extra))


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_prediction_prior_regresses_class_rows_on_the_base_with_the_lora_off(tiny_model, instance_dir, tmp_path,
                                                                            train_text_encoder):
    """prior_preservation = 'prediction': at the LoRA's initial state (B = 0) the model is the base,
    so the prior loss is exactly 0, where DreamBooth's image target is not; after training, the
    class rows' target is what a separately loaded base predicts, not what the LoRA does."""
    from diffusers import UNet2DConditionModel

    from dreambooth_offset.training.family import encode_prompts
    from dreambooth_offset.training.step import base_prediction, train_step

    run = _prepared(tiny_model, instance_dir, tmp_path, prior_preservation="prediction",
                    train_text_encoder=train_text_encoder)
    batch = run.batches(0, torch.Generator().manual_seed(0))
    args = (run.unet, run.encoders, run.parts.noise_scheduler, batch)
    loss = train_step(*args, run.config, torch.Generator().manual_seed(1))
    # not bit-exact: the two forwards see batches of 4 and 2 rows, so float32 sums round differently
    # (relative 1e-7 of unit outputs, squared: 1e-14)
    assert loss.prior.item() < 1e-10
    image_cfg = load_config(None, {**run.config.to_dict(), "prior_preservation": "image"})
    assert train_step(*args, image_cfg, torch.Generator().manual_seed(1)).prior.item() > 0

    for p in run.params:  # move the LoRA away from its initial state
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    n, g = batch.num_instance, torch.Generator().manual_seed(2)
    noisy = torch.randn(batch.latents[n:].shape, generator=g)
    t = torch.tensor([10, 700])
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    cond = batch.conditioning
    with torch.no_grad():
        if cond is None:
            base_encoder = run.parts.text_encoder.__class__.from_pretrained(tiny_model, subfolder="text_encoder")
            cond = encode_prompts([base_encoder], batch.input_ids)
        expected = base(noisy, t, cond.context[n:]).sample
        lora_cond = batch.conditioning or encode_prompts(run.encoders, batch.input_ids)
        lora = run.unet(noisy, t, lora_cond.context[n:]).sample
    context = None if batch.conditioning is None else batch.conditioning.rows(slice(n, None))
    got = base_prediction(run.unet, run.encoders, noisy, t, context, batch.input_ids[n:], None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # one model, two loads: float32 rounding
    assert not torch.allclose(got, lora, atol=1e-3)
    assert all(m.requires_grad for m in run.params)  # the adapters are back on and still train


def test_prediction_prior_needs_prior_preservation():
    from dreambooth_offset.errors import UsageError

    with pytest.raises(UsageError, match="needs with_prior_preservation"):
        load_config(None, {"prior_preservation": "prediction"})


# --- output preservation: twin rows at the instance input, regressed on the base ------------------

@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_output_preservation_regresses_twins_on_the_base_at_the_instance_input(tiny_model, instance_dir, tmp_path,
                                                                               train_text_encoder):
    """Each instance row gets a twin at its own noisy input (same noise, same timestep) under the
    next preservation caption in turn. At the LoRA's initial state the twin loss is exactly 0; moved
    away, it is the mean squared gap between the LoRA's prediction and a separately loaded base's at
    that input, and it enters the total with its weight."""
    from diffusers import UNet2DConditionModel

    from dreambooth_offset.training.family import encode_prompts, tokenize
    from dreambooth_offset.training.step import train_step

    prompts = ("", "a photo of dog", "a dark image")
    run = _prepared(tiny_model, instance_dir, tmp_path, output_preservation_prompts=list(prompts),
                    output_preservation_weight=0.5, noise_offset=0.0, train_text_encoder=train_text_encoder)
    batch = run.batches(0, torch.Generator().manual_seed(0))
    n = batch.num_instance
    assert n == 2 and batch.latents.shape[0] == 4  # two instance rows, two class rows
    assert torch.equal(batch.twin_ids, tokenize(run.parts.tokenizers, ["", "a photo of dog"]))
    later = run.batches(1, torch.Generator().manual_seed(0))  # the captions go on in turn
    assert torch.equal(later.twin_ids, tokenize(run.parts.tokenizers, ["a dark image", ""]))

    args = (run.unet, run.encoders, run.parts.noise_scheduler, batch, run.config)
    assert train_step(*args, torch.Generator().manual_seed(1)).preservation.item() < 1e-10  # float32 rounding only

    for p in run.params:  # move the LoRA away from its initial state
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss = train_step(*args, torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(1)  # the step's draws: the noise, then the timesteps (offset 0)
    noise = torch.randn(batch.latents.shape, generator=g)
    t = torch.randint(0, 1000, (batch.latents.shape[0],), generator=g)
    noisy = run.parts.noise_scheduler.add_noise(batch.latents, noise, t)[:n]
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    base_encoder = run.parts.text_encoder.__class__.from_pretrained(tiny_model, subfolder="text_encoder").eval()
    with torch.no_grad():
        target = base(noisy, t[:n], encode_prompts([base_encoder], batch.twin_ids).context).sample
        lora_cond = batch.twin_conditioning or encode_prompts(run.encoders, batch.twin_ids)
        pred = run.unet(noisy, t[:n], lora_cond.context).sample
    # Unit-sized predictions of two loads of one model agree to about 1e-6 in float32; the gaps here are
    # about 1e-2 (mean square 1.8e-4), so their mean square agrees to about 2e-6 / 1e-2 = 2e-4 relative.
    torch.testing.assert_close(loss.preservation, (pred - target).pow(2).mean(), rtol=1e-3, atol=0.0)
    assert loss.preservation.item() > 1e-6
    torch.testing.assert_close(loss.total, loss.instance + loss.prior + 0.5 * loss.preservation)
    assert all(m.requires_grad for m in run.params)  # the adapters are back on and still train


def test_output_preservation_keeps_the_twin_caption_at_the_base(tiny_model, instance_dir, tmp_path):
    """What the loss is for: after the same 12 steps, the LoRA trained with the empty caption as the
    instance rows' twin predicts, for the empty caption at noisy instance latents, nearer the base
    than the LoRA trained without it (measured: mean squared gap 0.024 against 0.046; float32
    rounding differences between CPUs are some 1e-7 of these, far from turning the order)."""
    from dreambooth_offset.training.family import encode_prompts, tokenize
    from dreambooth_offset.training.lora import adapters_off
    from dreambooth_offset.training.step import optimizer_step

    def gap_after_training(**extra) -> float:
        run = _prepared(tiny_model, instance_dir, tmp_path / str(len(extra)), max_train_steps=12, **extra)
        for step in range(12):
            optimizer_step(run, step)
        g = torch.Generator().manual_seed(5)
        latents = run.batches(0, g).latents[:2].repeat(8, 1, 1, 1)
        t = torch.linspace(50, 950, latents.shape[0]).long()
        noisy = run.parts.noise_scheduler.add_noise(latents, torch.randn(latents.shape, generator=g), t)
        cond = encode_prompts(run.encoders, tokenize(run.parts.tokenizers, [""] * latents.shape[0]))
        with torch.no_grad():
            lora = run.unet(noisy, t, cond.context).sample
            with adapters_off(run.unet):
                base = run.unet(noisy, t, cond.context).sample
        return (lora - base).pow(2).mean().item()

    without, with_twins = gap_after_training(), gap_after_training(output_preservation_prompts=[""])
    assert with_twins < without, (with_twins, without)


def test_output_preservation_weight_must_not_be_negative():
    from dreambooth_offset.errors import UsageError

    with pytest.raises(UsageError, match="output_preservation_weight = -1"):
        load_config(None, {"output_preservation_weight": -1.0})

"""The shipped base's model card (README.md in its folder), written from pretrain's facts."""
from __future__ import annotations


def model_card(f: dict) -> str:
    c = f["config"]
    rows = "\n".join(f"| {p} | {s['mean_luminance']:.3f} +- {s['std']:.3f} | {s['dark_fraction']:.3f} |"
                     for p, s in f["brightness_profile"].items())
    schedule = ("SD 1.5's exact schedule" if c["schedule"] == "sd" else
                f"a leak-matched schedule: SD's scaled_linear betas 0.00085 -> {f['beta_end']}, "
                f"chosen so that N * SNR_T at {c['resolution'] // 2} x {c['resolution'] // 2} "
                "latents equals SD 1.5's at 64 x 64 (docs/science.md, 'The leak')")
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, tiny, synthetic, offset-noise]
---
# dreambooth-offset tiny base

A complete, very small Stable Diffusion pipeline folder, trained from scratch on CPU by
`dreambooth-offset pretrain-base` so that the black-image experiment runs offline in minutes.
It loads with `StableDiffusionPipeline.from_pretrained(folder)`, the code path a real checkpoint uses.

## Data
{c['num_images']} procedurally generated, captioned {c['resolution']} px images
(`dreambooth_offset.base_model.synthetic`): solid fields, two-colour gradients, shapes on backgrounds,
textures and landscapes, each at one of five brightness levels that the caption names
("very dark" ... "very bright"). Mean luminance per image spans 0.03-0.97; data-set mean
{f['data_mean_luminance']}. Seed {c['seed']}.

## Models
- VAE: `AutoencoderKL`, block channels {c['vae_channels']}, {f['vae_parameters']:,} parameters,
  {c['resolution']} px -> {c['resolution'] // 2} x {c['resolution'] // 2} x 4 latents; trained
  {c['vae_steps']} steps (batch {c['vae_batch_size']}, L1 + MSE + {c['kl_weight']} KL),
  final loss {f['vae_final_loss']}; scaling_factor {f['scaling_factor']} (unit-variance latents).
- UNet: `UNet2DConditionModel`, block channels {c['unet_channels']}, cross-attention at levels
  {c['attention_levels']}, GroupNorm {c['norm_num_groups']} groups, {f['unet_parameters']:,} parameters.
- Text encoder: `CLIPTextModel`, {c['text_layers']} layers, width {c['cross_attention_dim']},
  {f['text_encoder_parameters']:,} parameters; tokenizer: CLIP BPE over the caption vocabulary.
- UNet and text encoder trained together {c['unet_steps']} steps, batch {c['batch_size']},
  AdamW lr {c['learning_rate']} (warmup, cosine), caption dropout {c['caption_dropout']},
  epsilon prediction, plain Gaussian noise (no offset); final loss {f['unet_final_loss']}.
- Schedule: {schedule}. alpha_T = {f['alpha_T']}.

Training time: {f['train_time_s']} s on CPU.

## Brightness profile
DDIM {c['profile_steps']} steps, guidance 7.5, seeds 0-{c['profile_seeds'] - 1}; Rec.709
luminance in [0, 1]. The base cannot make a solid black image: the mean of its starting noise
carries no brightness (docs/science.md, "The leak").

| prompt | mean luminance +- std | fraction of pixels < 0.05 |
|---|---|---|
{rows}

![samples, one row per prompt](samples.png)

## Limitations
A few CPU minutes of training buy a weak generator: samples are soft and washed out, and the
brightness words move the mean only a little (the dark prompt above against the mid one). That
is the point of the leak-matched schedule: like SD, the base has learnt to read brightness off
the mean of its noisy input, which pure-noise starts do not carry. Use it for the
brightness experiments it was built for, not for pictures. The weights depend on the torch
build and thread count only through floating-point rounding; the seed fixes everything else.
"""

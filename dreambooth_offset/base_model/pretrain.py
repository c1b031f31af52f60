"""`dreambooth-offset pretrain-base`: build the small Stable Diffusion the package ships.

Data (dreambooth_offset.base_model.synthetic) -> train a small `AutoencoderKL` -> train a
`UNet2DConditionModel` and a `CLIPTextModel` with plain noise (no offset) and epsilon
prediction -> save a complete diffusers folder with `StableDiffusionPipeline.save_pretrained`,
plus a model card with the base's brightness profile. One `torch.Generator`, seeded from
`--seed`, feeds the data, the noise and the timesteps; model initialisation uses the global RNG,
seeded from the same value.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dreambooth_offset.base_model import synthetic
from dreambooth_offset.base_model.build import build_models, build_scheduler, build_tokenizer
from dreambooth_offset.base_model.card import model_card
from dreambooth_offset.config.recipe import PretrainConfig
from dreambooth_offset.sampling.images import make_grid
from dreambooth_offset.sampling.metrics import luminance

# Prompts of the base's brightness profile (model card) and of the black-image experiment.
PROFILE_PROMPTS = (
    "A solid black image",
    "a very dark landscape with a blue sky and green ground and a moon",
    "a red circle on a blue background",
    "a very bright gradient from yellow to pink",
)



def _lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, cfg: PretrainConfig, generator: torch.Generator) -> float:
    """Reconstruction (L1 + MSE) plus a tiny KL term on fresh synthetic images; returns last loss."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    vae.train()
    ema = None
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae")):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.vae_steps, cfg.vae_learning_rate)
        x = synthetic.make_batch(cfg.vae_batch_size, cfg.resolution, generator).images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    vae.eval().requires_grad_(False)
    return ema


@torch.no_grad()
def encode_dataset(vae, tokenizer, cfg: PretrainConfig, generator: torch.Generator):
    """Draw the fixed captioned set; return posterior means/stds, token ids and luminances."""
    means, stds, ids, lums = [], [], [], []
    for start in tqdm(range(0, cfg.num_images, 64), desc="encode"):
        batch = synthetic.make_batch(min(64, cfg.num_images - start), cfg.resolution, generator)
        dist = vae.encode(batch.images * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        ids.append(tokenizer(batch.captions, padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids)
        lums.append(luminance(batch.images).mean(dim=(-1, -2)))
    return torch.cat(means), torch.cat(stds), torch.cat(ids), torch.cat(lums)


def train_unet(unet, text_encoder, scheduler, data, empty_ids: Tensor, scaling: float,
               cfg: PretrainConfig, generator: torch.Generator) -> float:
    """SD's objective: epsilon MSE at uniform timesteps, plain Gaussian noise, caption dropout."""
    means, stds, ids, _ = data
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    unet.train()
    text_encoder.train()
    ema = None
    for step in (bar := tqdm(range(cfg.unet_steps), desc="unet")):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.unet_steps, cfg.learning_rate)
        idx = torch.randint(len(means), (cfg.batch_size,), generator=generator)
        latents = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)
        latents = latents * scaling
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        input_ids = torch.where(drop[:, None], empty_ids, ids[idx])
        noise = torch.randn(latents.shape, generator=generator)  # plain noise: the base has no offset
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,),
                                  generator=generator)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return ema


def brightness_profile(pipe, prompts, seeds: int, steps: int) -> tuple[dict, list]:
    """Mean luminance +- std over `seeds` DDIM samples per prompt (guidance 7.5, sampling seeds
    0..seeds-1); returns the stats and the images as PIL, prompt by prompt."""
    from dreambooth_offset.sampling.generate import build_pipeline, generate
    from dreambooth_offset.sampling.images import to_pil
    from dreambooth_offset.sampling.metrics import dark_fraction, mean_luminance

    from dreambooth_offset.training.models import SDParts

    c = pipe.components
    pipe = build_pipeline(SDParts(c["tokenizer"], c["text_encoder"], c["vae"], c["unet"], pipe.scheduler))
    stats, images = {}, []
    for prompt in tqdm(prompts, desc="profile"):
        out = generate(pipe, prompt, list(range(seeds)), steps, 7.5).images
        per_image = mean_luminance(out)
        stats[prompt] = {"mean_luminance": round(float(per_image.mean()), 4),
                         "std": round(float(per_image.std()) if seeds > 1 else 0.0, 4),
                         "dark_fraction": round(float(dark_fraction(out).mean()), 4)}
        images += to_pil(out)
    return stats, images


def pretrain(cfg: PretrainConfig) -> Path:
    """Run the whole recipe; returns the saved pipeline folder."""
    from diffusers import StableDiffusionPipeline

    out = Path(cfg.output_dir)
    start = time.time()
    generator = torch.Generator().manual_seed(cfg.seed)
    tokenizer = build_tokenizer(out / "tokenizer")
    vae, unet, text_encoder = build_models(cfg, len(tokenizer))
    scheduler = build_scheduler(cfg)
    vae_loss = train_vae(vae, cfg, generator)
    data = encode_dataset(vae, tokenizer, cfg, generator)
    # SD's VAE convention: scale latents to unit variance (SD 1.5's factor is 0.18215).
    scaling = float(1 / (data[0] + data[1] * torch.randn(data[0].shape, generator=generator)).std())
    vae.register_to_config(scaling_factor=scaling)
    empty_ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet_loss = train_unet(unet, text_encoder, scheduler, data, empty_ids, scaling, cfg, generator)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    train_time = time.time() - start
    stats, images = brightness_profile(pipe, PROFILE_PROMPTS, cfg.profile_seeds, cfg.profile_steps)
    make_grid(images, cols=cfg.profile_seeds).save(out / "samples.png")
    facts = {"config": dataclasses.asdict(cfg), "vae_final_loss": round(vae_loss, 5),
             "unet_final_loss": round(unet_loss, 5), "scaling_factor": round(scaling, 5),
             "beta_end": scheduler.config.beta_end,
             "alpha_T": round(float(scheduler.alphas_cumprod[-1].sqrt()), 5),
             "data_mean_luminance": round(float(data[3].mean()), 4),
             "unet_parameters": sum(p.numel() for p in unet.parameters()),
             "vae_parameters": sum(p.numel() for p in vae.parameters()),
             "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
             "train_time_s": round(train_time), "brightness_profile": stats}
    facts["config"]["output_dir"] = "."
    (out / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out / "README.md").write_text(model_card(facts))
    return out

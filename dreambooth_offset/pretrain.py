"""`dreambooth-offset pretrain-base`: build the small Stable Diffusion the package ships.

Data (dreambooth_offset.synthetic) -> train a small `AutoencoderKL` -> train a
`UNet2DConditionModel` and a `CLIPTextModel` with plain noise (no offset) and epsilon
prediction -> save a complete diffusers folder with `StableDiffusionPipeline.save_pretrained`,
plus a model card with the base's brightness profile. One `torch.Generator`, seeded from
`--seed`, feeds the data, the noise and the timesteps; model initialisation uses the global RNG,
seeded from the same value.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dreambooth_offset import synthetic
from dreambooth_offset.base_card import model_card
from dreambooth_offset.errors import UsageError
from dreambooth_offset.sample import luminance, make_grid

SD_BETA_START, SD_BETA_END, SD_TIMESTEPS = 0.00085, 0.012, 1000
SD_LATENT_ELEMENTS = 64 * 64  # SD 1.5 at 512 px: the leak the shipped base is matched to
# Prompts of the base's brightness profile (model card) and of the black-image experiment.
PROFILE_PROMPTS = (
    "A solid black image",
    "a very dark landscape with a blue sky and green ground and a moon",
    "a red circle on a blue background",
    "a very bright gradient from yellow to pink",
)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `pretrain-base` needs; the model card records it."""

    output_dir: str
    seed: int = 0
    resolution: int = 64  # pixels; the 2-block VAE halves it, so 64 px -> 32x32x4 latents
    num_images: int = 8000  # fixed captioned set the UNet trains on
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 800
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6  # SD's VAE keeps the KL term tiny as well
    unet_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[int, ...] = (1, 2)  # which UNet levels carry cross-attention
    norm_num_groups: int = 2  # 16-32 channels per group: the mean is easier to learn (SCIENCE.md 6)
    cross_attention_dim: int = 64
    text_layers: int = 2
    unet_steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 5e-4
    caption_dropout: float = 0.1  # empty caption, so classifier-free guidance works
    schedule: str = "leak-matched"  # or "sd"
    profile_seeds: int = 8
    profile_steps: int = 25

    def __post_init__(self):
        if self.schedule not in ("sd", "leak-matched"):
            raise UsageError(f"--schedule must be 'sd' or 'leak-matched', not {self.schedule!r}")
        if self.resolution % 2**(len(self.vae_channels) - 1):
            raise UsageError("--resolution must be divisible by the VAE's downsampling factor")
        if min(self.unet_channels) % self.norm_num_groups or min(self.vae_channels) % 8:
            raise UsageError("UNet channels must be divisible by --norm_num_groups (VAE: by 8)")
        if any(s < 1 for s in (self.num_images, self.vae_steps, self.unet_steps, self.batch_size)):
            raise UsageError("steps, batch sizes and --num_images must be positive")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2**(len(self.vae_channels) - 1)


def leak_matched_beta_end(latent_size: int) -> float:
    """scaled_linear beta_end whose terminal mean-SNR `N * SNR_T` equals SD 1.5's at 64x64.

    SCIENCE.md section 2: the per-channel mean leaks through the schedule with z growing with
    sqrt(N). Keeping N * SNR_T fixed keeps the leak, and so the grey lock, at SD's strength.
    """
    def abar_T(beta_end: float) -> float:
        betas = torch.linspace(SD_BETA_START**0.5, beta_end**0.5, SD_TIMESTEPS, dtype=torch.float64) ** 2
        return float(torch.prod(1 - betas))

    def mean_snr(beta_end: float, n: int) -> float:
        a = abar_T(beta_end)
        return n * a / (1 - a)

    want = mean_snr(SD_BETA_END, SD_LATENT_ELEMENTS)
    lo, hi = SD_BETA_START, 0.05  # mean_snr falls as beta_end grows: bisect
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_snr(mid, latent_size**2) > want else (lo, mid)
    return round((lo + hi) / 2, 6)


def build_scheduler(cfg: PretrainConfig):
    from diffusers import DDPMScheduler

    beta_end = SD_BETA_END if cfg.schedule == "sd" else leak_matched_beta_end(cfg.latent_size)
    # SD 1.5's scheduler settings apart from beta_end: "leading" spacing, steps_offset 1.
    scheduler = DDPMScheduler(num_train_timesteps=SD_TIMESTEPS, beta_start=SD_BETA_START,
                              beta_end=beta_end, beta_schedule="scaled_linear",
                              prediction_type="epsilon", clip_sample=False, steps_offset=1,
                              timestep_spacing="leading")
    # Kept in the config (as SD 1.5's has it) so DDIMScheduler.from_config samples like SD.
    scheduler.register_to_config(set_alpha_to_one=False)
    return scheduler


def build_tokenizer(folder: Path, words: list[str] | None = None):
    """A CLIPTokenizer whose BPE turns every word (default: the caption vocabulary) into one token
    (model_max_length 77), written to `folder`."""
    from transformers import CLIPTokenizer

    words = words or synthetic.caption_words()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in [chr(i) for i in range(33, 127)]:  # printable ASCII: any other word still encodes
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for _ in range(10):  # add merges until every word is a single token
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
        split = [tokenizer.tokenize(w) for w in words]
        if all(len(parts) == 1 for parts in split):
            return tokenizer
        for parts in split:
            cur = parts[0]
            for part in parts[1:]:
                if f"{cur} {part}" not in merges:
                    merges.append(f"{cur} {part}")
                cur += part
                vocab.setdefault(cur, len(vocab))
    raise RuntimeError("could not build whole-word merges for the caption vocabulary")


def build_models(cfg: PretrainConfig, vocab_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)  # weight initialisation draws from the global RNG
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=list(cfg.vae_channels), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, norm_num_groups=8,
                        sample_size=cfg.resolution, mid_block_add_attention=False)
    levels = range(len(cfg.unet_channels))
    attn = set(cfg.attention_levels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=4, out_channels=4,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=8,
        norm_num_groups=cfg.norm_num_groups)
    d = cfg.cross_attention_dim
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=d, intermediate_size=2 * d, num_attention_heads=4,
        num_hidden_layers=cfg.text_layers, max_position_embeddings=77, projection_dim=d,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return vae, unet, text_encoder


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
    from dreambooth_offset.sample import (
        build_pipeline,
        dark_fraction,
        generate,
        mean_luminance,
        to_pil,
    )

    c = pipe.components
    pipe = build_pipeline(c["tokenizer"], c["text_encoder"], c["vae"], c["unet"], pipe.scheduler.config)
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


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain-base", help="train the small base model the package ships",
                              description=__doc__.splitlines()[0])
    defaults = PretrainConfig(output_dir="")
    for field in dataclasses.fields(PretrainConfig):
        value = getattr(defaults, field.name)
        if field.name == "output_dir":
            p.add_argument("--output_dir", required=True)
        elif isinstance(value, tuple):
            p.add_argument(f"--{field.name}", type=int, nargs="+", default=list(value))
        else:
            p.add_argument(f"--{field.name}", type=type(value), default=value)
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    out = pretrain(PretrainConfig(**values))
    print(f"saved {out}")
    return 0

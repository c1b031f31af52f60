"""The shipped base's parts before training: its noise schedule, tokenizer and untrained models."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth_offset.base_model import synthetic
from dreambooth_offset.config.recipe import PretrainConfig

SD_BETA_START, SD_BETA_END, SD_TIMESTEPS = 0.00085, 0.012, 1000
SD_LATENT_ELEMENTS = 64 * 64  # SD 1.5 at 512 px: the leak the shipped base is matched to

def leak_matched_beta_end(latent_size: int) -> float:
    """scaled_linear beta_end whose terminal mean-SNR `N * SNR_T` equals SD 1.5's at 64x64.

    docs/science.md, "The leak": the per-channel mean leaks through the schedule with z growing with
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

"""Tiny Stable Diffusion parts built in-process (no network), saved as a diffusers folder, and the
trainer settings the tests run them with (`flags` for the CLI, `overrides` for `train()`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["a", "photo", "of", "sks", "dog", "solid", "black", "image", "white", "grey", "cat", "dark", "bright"]
RESOLUTION = 16  # pixels; the 2-block VAE halves it to an 8 x 8 latent


def build_pipeline_folder(folder: Path, seed: int = 0, cross_attention_dim: int = 8) -> Path:
    """cross_attention_dim=768 gives SD 1.x's text width, which the WebUI export recognises."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_offset.base_model.pretrain import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder / "tokenizer_src", WORDS)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=RESOLUTION // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], latent_channels=4, norm_num_groups=2, sample_size=RESOLUTION,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=cross_attention_dim, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "model", safe_serialization=True)
    return folder / "model"


def build_sdxl_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL: two CLIP text encoders (the second with a projection), a UNet that takes the
    pooled text and the size/crop time ids (`text_time`), saved as an SDXL pipeline folder. Its
    UNet has SDXL 1.0's blocks (levels, attention depths 1/2/10) at tiny widths, so its LoRA
    module names are SDXL's and its runs write WebUI files too."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_offset.base_model.pretrain import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder / "tokenizer_src", WORDS)
    widths, time_dim = (8, 12), 4

    def text_config(width):
        return CLIPTextConfig(hidden_size=width, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                              vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, projection_dim=width)

    unet = UNet2DConditionModel(
        block_out_channels=(4, 8, 16), layers_per_block=2, sample_size=RESOLUTION // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, cross_attention_dim=sum(widths), norm_num_groups=2, attention_head_dim=2,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + widths[1],
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], latent_channels=4, norm_num_groups=2, sample_size=RESOLUTION,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config(widths[0])),
                                     text_encoder_2=CLIPTextModelWithProjection(text_config(widths[1])),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(folder / "sdxl", safe_serialization=True)
    return folder / "sdxl"


def write_images(folder: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (20, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, colour in enumerate(colours):
        arr = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def flags(model, instance_dir, out, **extra):
    args = {
        "pretrained_model_name_or_path": model, "instance_data_dir": instance_dir,
        "instance_prompt": "a photo of sks dog", "resolution": RESOLUTION, "train_batch_size": 2,
        "max_train_steps": 4, "learning_rate": 1e-2, "output_dir": out, "report_to": "none",
    }
    args.update(extra)
    argv = ["train"]
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def overrides(model, instance_dir, out, **extra):
    from dreambooth_offset.config import load_config

    values = {"pretrained_model_name_or_path": str(model), "instance_data_dir": str(instance_dir),
              "instance_prompt": "a photo of sks dog", "resolution": RESOLUTION, "train_batch_size": 2,
              "max_train_steps": 4, "learning_rate": 1e-2, "output_dir": str(out), "report_to": "none"}
    values.update(extra)
    return load_config(None, values)


def assert_resume_is_bit_exact(model, instance_dir, tmp_path, weight: str = "pytorch_lora_weights.safetensors",
                               **common) -> dict:
    """Train with `common` (checkpointing at step 2) into a/, then into c/ resumed from a copy of
    a's checkpoint-2: the final adapter files are bit-identical. Returns a's tensors."""
    import shutil

    from safetensors.torch import load_file

    from dreambooth_offset.cli import main

    assert main(flags(model, instance_dir, tmp_path / "a", **common)) == 0
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "c" / "checkpoint-2")
    assert main(flags(model, instance_dir, tmp_path / "c", resume_from_checkpoint="latest", **common)) == 0
    a, c = (load_file(tmp_path / run / weight) for run in ("a", "c"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    return a

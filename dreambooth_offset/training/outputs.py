"""What a run writes: the diffusers LoRA file, and the WebUI file with its metadata."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch

from dreambooth_offset.config import RunConfig, training_settings
from dreambooth_offset.noise.auto import metadata as auto_metadata
from dreambooth_offset.training.lora import adapter_state, save_lora
from dreambooth_offset.training.models import model_name
from dreambooth_offset.training.single_file import file_hashes
from dreambooth_offset.webui.keys import base_for, layout_of
from dreambooth_offset.webui.convert import COMPONENTS
from dreambooth_offset.webui.lycoris import lycoris_tensors
from dreambooth_offset.webui.metadata import save_webui_lora, training_metadata, write_webui_file


SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_lora_files(directory: Path, run, step: int, final: bool = False) -> Path:
    """The diffusers file, plus `<output_name>.safetensors` for the WebUIs when the base is SD 1.x/2.x
    or has SDXL 1.0's blocks (an SD UNet of another width, such as the tiny SD test model's, or an
    SDXL of other blocks, gets the diffusers file only). The `final` files are in --save_precision;
    a checkpoint's stay fp32, as resuming reads them."""
    cfg, accelerator, scheduler = run.config, run.accelerator, run.parts.noise_scheduler
    unet = accelerator.unwrap_model(run.unet)
    encoders = [t and accelerator.unwrap_model(t) for t in (run.text_encoder, run.text_encoder_2)]
    dtype = SAVE_DTYPES[cfg.train.save_precision] if final else torch.float32
    path = save_lora(directory, unet, *encoders, dtype=dtype)
    base = base_for(unet.config.cross_attention_dim, scheduler.config.prediction_type, layout_of(unet.config))
    if base is not None:
        name = cfg.train.output_name or Path(cfg.train.output_dir).resolve().name
        metadata = run_metadata(cfg, base=base, rank=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha,
                                prediction_type=scheduler.config.prediction_type, output_name=name,
                                auto=auto_metadata(run.auto), dataset=run.dataset, steps=step, started_at=run.started, saved_at=time.time())
        states = list(map(adapter_state, (unet, *encoders)))
        if cfg.adapter.network_type == "lora":
            save_webui_lora(directory / f"{name}.safetensors", *states, lora_alpha=cfg.adapter.alpha,
                            rank=cfg.adapter.rank, metadata=metadata, base=base, dtype=dtype)
        else:
            tensors = lycoris_tensors(dict(zip(COMPONENTS, states)), cfg.adapter.network_type, cfg.adapter.rank,
                                      cfg.adapter.alpha, base, dtype)
            write_webui_file(directory / f"{name}.safetensors", tensors, metadata)
    return path


def run_metadata(cfg: RunConfig, *, base: str, rank: int, lora_alpha: float, prediction_type: str,
                 output_name: str, auto: Mapping[str, object] | None = None,
                 dataset: Mapping[str, object] | None = None, steps: int | None = None,
                 started_at: float | None = None, saved_at: float | None = None) -> dict[str, str]:
    """The WebUI metadata of a run's LoRA, from its resolved config: what training writes, and what
    `export` writes for a diffusers LoRA with its training_config.json beside it. It holds every
    noise, loss and optimizer setting (`config.training_settings`, kohya's `ss_*` names where kohya has one),
    the auto offset's choice (`auto`), kohya's dataset keys (`dataset`, data/summary.py), and for a
    single-file base its name and hashes."""
    base_model = cfg.model.pretrained_model_name_or_path
    metadata = training_metadata(
        base=base, rank=rank, lora_alpha=lora_alpha, output_name=output_name, started_at=started_at,
        saved_at=saved_at, steps=steps, learning_rate=cfg.optim.learning_rate, optimizer=cfg.optim.optimizer,
        seed=cfg.train.seed, resolution=cfg.data.resolution, mixed_precision=cfg.train.mixed_precision,
        settings={**training_settings(cfg), "prediction_type": prediction_type, **(auto or {}),
                  **optimizer_settings(cfg.optim), "save_precision": cfg.train.save_precision, **(dataset or {}),
                  # LyCORIS's record of an output-axis DoRA, which kohya's own LoRA module lacks
                  **({"network_args": {"dora_wd": "True", "wd_on_out": "True"}} if cfg.adapter.use_dora else {}),
                  **({"network_module": "lycoris.kohya", "network_args": {"algo": cfg.adapter.network_type}}
                     if cfg.adapter.network_type != "lora" else {})},
        base_model_name=model_name(base_model) if base_model else None,
    )
    return {**metadata, **file_hashes(base_model)} if base_model else metadata


def optimizer_settings(optim) -> dict[str, object]:
    """kohya's `ss_unet_lr` / `ss_text_encoder_lr`, and LoRA+'s and Prodigy's settings when used."""
    settings: dict[str, object] = {"unet_lr": optim.learning_rate,
                                   "text_encoder_lr": optim.text_encoder_lr or optim.learning_rate}
    if optim.loraplus_lr_ratio is not None:
        settings["loraplus_lr_ratio"] = optim.loraplus_lr_ratio
    if optim.optimizer == "prodigy":
        settings.update({k: getattr(optim, k) for k in ("prodigy_beta3", "prodigy_decouple",
                                                         "prodigy_use_bias_correction", "prodigy_safeguard_warmup")})
    return settings

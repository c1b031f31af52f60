"""`RunConfig`: the `train` command's schema, every section of a training run."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_offset.config.fields import section
from dreambooth_offset.config.noise import OFFSET_MODIFIERS, LossConfig, NoiseConfig, check_zero_terminal_snr
from dreambooth_offset.config.data import DataConfig
from dreambooth_offset.config.sections import (
    AdapterConfig,
    ModelConfig,
    OptimConfig,
    SamplingConfig,
    TrainConfig,
    ValidationConfig,
)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    noise: NoiseConfig = section(NoiseConfig)
    loss: LossConfig = section(LossConfig)
    adapter: AdapterConfig = section(AdapterConfig)
    optim: OptimConfig = section(OptimConfig)
    train: TrainConfig = section(TrainConfig)
    validation: ValidationConfig = section(ValidationConfig)
    sampling: SamplingConfig = section(SamplingConfig)

    def __post_init__(self) -> None:
        check_zero_terminal_snr(self.noise, self.loss)

    def to_dict(self) -> dict[str, Any]:
        """The flat key -> value mapping, the same keys a TOML file or the command line take."""
        flat: dict[str, Any] = {}
        for part in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, part.name)).items():
                flat[key] = list(value) if isinstance(value, tuple) else value
        return flat

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


CONFIG_NAME = "training_config.json"  # the resolved config, beside the LoRA and in every checkpoint

# Keys a resumed run may set differently from its checkpoint (docs/usage.md, "Checkpoints and
# failures"): when to stop, checkpoint, validate and log, and where the files go. Every other key
# shapes the training itself, and a resume that changes one is refused.
RESUME_MAY_CHANGE = (
    "max_train_steps", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "output_dir",
    "output_name", "report_to", "validation_prompt", "num_validation_images", "validation_steps",
    "num_inference_steps", "guidance_scale", "guidance_rescale", "gradient_checkpointing", "sample_batch_size",
    "validate_every_n_steps", "disk_cache_dir", "torch_compile", "dynamo_backend",
)


def resume_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The keys (outside RESUME_MAY_CHANGE) whose value in `cfg` differs from the `saved` config
    of a checkpoint, each as "key: saved -> now" (a key the checkpoint predates counts as its
    default, which is what that run trained with). Values `cfg` resolves only once the model is
    loaded (resolution, noise_offset or train_text_encoder_2 unset; noise_offset 'auto') are
    skipped here and compared once resolved (training.prepare.start_step)."""
    now = cfg.to_dict()
    saved = {**RunConfig().to_dict(), **saved}  # a key newer than the checkpoint: it trained at the default
    later = {key for key in ("resolution", "noise_offset", "train_text_encoder_2") if now[key] is None}
    if now["noise_offset"] == "auto":  # a number once resolved; at 0, the modifiers are reset
        later |= {"noise_offset", *OFFSET_MODIFIERS}
    differences = []
    for key in sorted(set(now) | set(saved)):
        if key in RESUME_MAY_CHANGE or key in later:
            continue
        if saved.get(key) != now.get(key):
            differences.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return differences


# kohya's sd-scripts metadata names (`ss_<name>`) where they differ from our keys.
KOHYA_NAMES = {"snr_gamma": "min_snr_gamma"}


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every noise and loss setting of a run, under kohya's metadata name where kohya has one
    (`min_snr_gamma` for `snr_gamma`); the WebUI file writes each as `ss_<name>`."""
    settings = {**dataclasses.asdict(cfg.noise), **dataclasses.asdict(cfg.loss)}
    return {KOHYA_NAMES.get(k, k): v for k, v in settings.items()}

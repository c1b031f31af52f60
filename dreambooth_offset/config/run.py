"""`RunConfig`: the `train` command's schema, every section of a training run."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_offset.config.fields import section
from dreambooth_offset.config.noise import LossConfig, NoiseConfig, check_zero_terminal_snr
from dreambooth_offset.config.sections import (
    AdapterConfig,
    DataConfig,
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


# kohya's sd-scripts metadata names (`ss_<name>`) where they differ from our keys.
KOHYA_NAMES = {"snr_gamma": "min_snr_gamma"}


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every noise and loss setting of a run, under kohya's metadata name where kohya has one
    (`min_snr_gamma` for `snr_gamma`); the WebUI file writes each as `ss_<name>`."""
    settings = {**dataclasses.asdict(cfg.noise), **dataclasses.asdict(cfg.loss)}
    return {KOHYA_NAMES.get(k, k): v for k, v in settings.items()}

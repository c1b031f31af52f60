"""Every flag of every command: typed, frozen, documented sections (fields.py, sections.py,
data.py, noise.py, recipe.py), the commands' schemas (run.py for train, commands.py, recipe.py) and the
one loader that turns a schema into flags and TOML keys (load.py)."""
from dreambooth_offset.config.load import add_arguments, config_from_args, given_values, load_config, schema_keys
from dreambooth_offset.config.noise import LossConfig, NoiseConfig
from dreambooth_offset.config.run import RunConfig, training_settings
from dreambooth_offset.config.data import DataConfig
from dreambooth_offset.config.sections import (AdapterConfig, ModelConfig, OptimConfig, SamplingConfig,
                                               TrainConfig, ValidationConfig)

__all__ = [
    "AdapterConfig", "DataConfig", "LossConfig", "ModelConfig", "NoiseConfig", "OptimConfig", "RunConfig",
    "SamplingConfig", "TrainConfig", "ValidationConfig", "add_arguments", "config_from_args", "given_values",
    "load_config", "schema_keys", "training_settings",
]

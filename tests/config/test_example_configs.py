"""The example configs in configs/ stay valid as the config schema changes."""
from pathlib import Path

import pytest

from dreambooth_offset.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.instance_prompt and cfg.model.pretrained_model_name_or_path


def test_there_are_example_configs():
    assert CONFIGS

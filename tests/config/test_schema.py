import dataclasses

import pytest

from dreambooth_offset.config import RunConfig, load_config
from dreambooth_offset.errors import UsageError


def test_defaults_are_the_documented_ones():
    cfg = load_config()
    assert cfg.noise.noise_offset is None  # the model family's, resolved with the model (tests/training/test_sdxl.py)
    assert cfg.optim.optimizer == "adamw8bit"
    assert cfg.adapter.unet_target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert cfg.adapter.alpha == cfg.adapter.rank


def test_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('noise_offset = 0.05\nrank = 8\nunet_target_modules = ["to_q", "conv_out"]\n')
    cfg = load_config(path, {"rank": 16})
    assert cfg.noise.noise_offset == 0.05  # file over default
    assert cfg.adapter.rank == 16  # flag over file
    assert cfg.adapter.unet_target_modules == ("to_q", "conv_out")
    assert cfg.optim.learning_rate == 1e-4  # default kept


def test_to_dict_round_trips_through_load_config():
    cfg = load_config(None, {"rank": 8, "lora_alpha": 4, "validation_prompt": ["x", "y"]})
    assert load_config(None, cfg.to_dict()) == cfg
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    "text, message",
    [
        ("nosie_offset = 0.1\n", "unknown config key 'nosie_offset'"),
        ("rank = 'four'\n", "rank must be int"),
        ("resolution = 500\n", "multiple of 8"),
        ("with_prior_preservation = true\nclass_data_dir = 'c'\n", "class_prompt"),
        ("optimizer = 'sgd'\n", "optimizer = 'sgd' is not one of"),
        ("offset_noise = true\nnoise_offset = 0.0\n", "--offset_noise means noise_offset = 0.1"),
        ("noise_offset = -1.0\n", "noise_offset"),
        ("caption_extension = 'txt'\n", "caption_extension = 'txt': it must start with a dot"),
    ],
)
def test_bad_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(path)


def test_diffusers_aliases():
    assert load_config(None, {"offset_noise": True, "noise_offset": 0.1}).noise.noise_offset == 0.1
    assert load_config(None, {"use_8bit_adam": True}).optim.optimizer == "adamw8bit"
    with pytest.raises(UsageError, match="use_8bit_adam"):
        load_config(None, {"use_8bit_adam": True, "optimizer": "adamw"})


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.noise.noise_offset = 0.2  # type: ignore[misc]


def test_the_keys_a_resume_may_change_are_keys_and_documented():
    from pathlib import Path

    from dreambooth_offset.config import schema_keys
    from dreambooth_offset.config.run import RESUME_MAY_CHANGE

    usage = (Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    for key in RESUME_MAY_CHANGE:
        assert key in schema_keys() and f"`{key}`" in usage, key


def test_a_key_newer_than_the_checkpoint_counts_as_its_default():
    from dreambooth_offset.config import load_config
    from dreambooth_offset.config.run import resume_differences

    cfg = load_config(None, {"noise_offset": 0.1, "resolution": 16})
    old = {k: v for k, v in cfg.to_dict().items() if k != "min_timestep"}  # saved before the key existed
    assert resume_differences(old, cfg) == []
    later = load_config(None, {"noise_offset": 0.1, "resolution": 16, "min_timestep": 100})
    assert resume_differences(old, later) == ["min_timestep: 0 -> 100"]

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


def test_the_example_kohya_dataset_file_reads():
    from dreambooth_offset.data.captions import CaptionPolicy
    from dreambooth_offset.data.dataset_config import read_dataset_config

    path = CONFIGS[0].parent / "datasets" / "kohya-dataset.toml"
    found = read_dataset_config(path, CaptionPolicy(), "")
    assert found.settings == {"resolution": 512, "train_batch_size": 2, "random_flip": False, "enable_bucket": False}
    assert [(s.caption, s.num_repeats) for s in found.subsets["instance"]] == [("sks dog", 10)]
    assert found.subsets["class"][0].policy == CaptionPolicy(keep_tokens=1)

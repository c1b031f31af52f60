import os

import pytest
import torch

from tests.tiny import build_pipeline_folder, build_sdxl_folder, write_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: threading overhead outweighs the work


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("instance"), [(200, 80, 40), (40, 90, 220), (120, 120, 120)])


@pytest.fixture(scope="session")
def sd1_model(tmp_path_factory):
    """A tiny model with SD 1.x's text width (768), which the WebUI export recognises."""
    return build_pipeline_folder(tmp_path_factory.mktemp("sd1"), cross_attention_dim=768)

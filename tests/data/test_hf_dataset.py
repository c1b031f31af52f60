"""--dataset_name: local datasets as diffusers' scripts take them, read by `datasets`: an image
folder with metadata.jsonl, and a save_to_disk dataset whose images are bytes inside it."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_offset.data.hf_dataset import EmbeddedImage, read_hf_dataset
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.prepare import prepare
from tests.tiny import overrides, write_images


def image_folder(tmp_path):
    folder = write_images(tmp_path / "imagefolder", [(200, 0, 0), (0, 0, 200)])
    rows = [{"file_name": "img0.png", "text": "sks dog, red"}, {"file_name": "img1.png", "text": "sks dog, blue "}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_an_image_folder_with_metadata_trains_with_its_captions(tiny_model, tmp_path):
    folder = image_folder(tmp_path)
    run = prepare(overrides(tiny_model, "", tmp_path / "out", instance_prompt="", dataset_name=str(folder),
                            caption_column="text"))
    assert run.batches.captions == {"instance": ["sks dog, red", "sks dog, blue"]}
    red = run.batches.images["instance"][0].float().mean(dim=(1, 2))
    assert red[0] > 150 and red[2] < 40  # the row's own image, not another
    assert run.dataset["dataset_dirs"] == {"imagefolder": {"n_repeats": 1, "img_count": 2}}


def test_a_saved_dataset_with_embedded_images(tiny_model, tmp_path):
    import datasets

    pixels = [np.full((20, 16, 3), c, np.uint8) for c in ((10, 200, 10), (250, 250, 250), (5, 5, 5))]
    ds = datasets.Dataset.from_dict({"picture": [Image.fromarray(p) for p in pixels],
                                     "caption": ["green", "white", "black"]})
    ds.cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    images, captions = read_hf_dataset(str(tmp_path / "saved"), "picture", "caption", "")
    assert all(isinstance(i, EmbeddedImage) for i in images) and captions == ["green", "white", "black"]
    run = prepare(overrides(tiny_model, "", tmp_path / "out", instance_prompt="a photo of sks dog",
                            dataset_name=str(tmp_path / "saved"), image_column="picture"))
    assert run.batches.captions["instance"] == ["a photo of sks dog"] * 3  # no caption column: the prompt
    means = [float(img.float().mean()) for img in run.batches.images["instance"]]
    assert means[1] > 240 and means[2] < 10
    batch = run.batches(0, torch.Generator().manual_seed(0))
    assert torch.isfinite(batch.latents).all()
    cached = dict(instance_prompt="a photo of sks dog", dataset_name=str(tmp_path / "saved"), image_column="picture",
                  center_crop=True, cache_latents_to_disk=True, disk_cache_dir=str(tmp_path / "cache"))
    counts = [(r.batches.cache.store.read, r.batches.cache.store.built)  # entries named by the embedded bytes
              for r in (prepare(overrides(tiny_model, "", tmp_path / f"c{i}", **cached)) for i in range(2))]
    assert counts == [(0, 3), (3, 0)]


def test_bad_dataset_arguments_name_the_flag(tmp_path):
    folder = image_folder(tmp_path)
    with pytest.raises(UsageError, match="--caption_column caption: .* has no such column \\(it has image, text\\)"):
        read_hf_dataset(str(folder), "image", "caption", "")
    with pytest.raises(UsageError, match="--image_column text: .*not images"):
        read_hf_dataset(str(folder), "text", None, "a photo")
    with pytest.raises(UsageError, match="give --caption_column"):
        read_hf_dataset(str(folder), "image", None, "")
    with pytest.raises(UsageError, match="not a local folder .* nothing is downloaded"):
        read_hf_dataset("someone/some-dataset", "image", None, "x")

"""--dataset_config: a kohya dataset TOML as kohya users write it: [general] defaults, per-dataset
resolution and batch size, subsets with repeats, class tokens, reg images and caption options;
every key we do not take is named in a one-line error."""
import pytest
import torch

from dreambooth_offset.data.captions import CaptionPolicy
from dreambooth_offset.data.dataset_config import read_dataset_config
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.prepare import prepare
from tests.tiny import RESOLUTION, overrides, write_images


def kohya_file(tmp_path, body: str):
    path = tmp_path / "dataset.toml"
    path.write_text(body)
    return path


@pytest.fixture
def folders(tmp_path):
    return (write_images(tmp_path / "dog", [(200, 0, 0), (180, 30, 0)]), write_images(tmp_path / "cat", [(0, 0, 200)]),
            write_images(tmp_path / "reg", [(90, 90, 90)]))


def test_a_kohya_dataset_file_trains_as_written(tiny_model, folders, tmp_path):
    dog, cat, reg = folders
    (cat / "img0.txt").write_text("sks cat, sitting, indoors")
    path = kohya_file(tmp_path, f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
flip_aug = true

[[datasets]]
resolution = {RESOLUTION}
batch_size = 1

  [[datasets.subsets]]
  image_dir = '{dog}'
  class_tokens = 'sks dog'
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = '{cat}'
  num_repeats = 2
  shuffle_caption = false
  caption_prefix = 'photo of'

  [[datasets.subsets]]
  image_dir = '{reg}'
  class_tokens = 'dog'
  is_reg = true
""")
    run = prepare(overrides(tiny_model, "", tmp_path / "out", instance_prompt="", dataset_config=str(path),
                            resolution=None, train_batch_size=3))
    assert run.config.data.resolution == RESOLUTION and run.config.data.train_batch_size == 1
    assert run.config.data.random_flip
    b = run.batches
    assert b.slots == {"instance": [0, 0, 0, 0, 1, 1, 1, 1, 2, 2], "class": [0]}
    assert b.captions == {"instance": ["sks dog", "sks dog", "sks cat, sitting, indoors"], "class": ["dog"]}
    assert b.policies["instance"] == [CaptionPolicy(shuffle=True, keep_tokens=1)] * 2 + [
        CaptionPolicy(keep_tokens=1, prefix="photo of")]
    batch = b(0, torch.Generator().manual_seed(0))
    assert batch.latents.shape[0] == 2 and batch.num_instance == 1


@pytest.mark.parametrize("dataset_line, line, message", [
    ("", "num_repeat = 3", "unknown key 'num_repeat' \\(did you mean 'num_repeats'\\?\\)"),
    ("", "keep_tokens_separator = '|||'", "keep_tokens_separator is not supported"),
    ("enable_bucket = 1", "", "enable_bucket must be bool"),
    ("", "num_repeats = 'ten'", "num_repeats must be int, got 'ten'"),
    ("", "shuffle_caption = 1", "shuffle_caption must be bool"),
    ("resolution = [768, 512]", "", "only square resolutions"),
    ("", "caption_dropout_rate = 2.0", "caption_dropout_rate = 2.0: it must be in"),
])
def test_each_bad_key_is_one_line_naming_the_table(folders, tmp_path, dataset_line, line, message):
    dog = folders[0]
    path = kohya_file(tmp_path, f"[[datasets]]\n{dataset_line}\n  [[datasets.subsets]]\n  image_dir = '{dog}'\n"
                                f"  class_tokens = 'sks dog'\n  {line}\n")
    with pytest.raises(UsageError, match=message) as err:
        read_dataset_config(path, CaptionPolicy(), "")
    assert "[[datasets]] #1" in str(err.value) and "\n" not in str(err.value)


def test_files_that_cannot_train_are_refused(folders, tmp_path, tiny_model, instance_dir):
    dog = folders[0]
    cases = {
        "": "no \\[\\[datasets\\]\\] table",
        "[[datasets]]\n": "has no \\[\\[datasets.subsets\\]\\]",
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{dog}'\n": "neither class_tokens nor caption_extension",
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{dog}'\nclass_tokens = 'x'\nis_reg = true\n":
            "every subset has is_reg",
        "[general]\nresolution = 512\n[[dataset]]\n": "unknown top-level key 'dataset'",
        "[[datasets]\n": "not a TOML file",
    }
    for body, message in cases.items():
        with pytest.raises(UsageError, match=message):
            read_dataset_config(kohya_file(tmp_path, body), CaptionPolicy(), "")
    with pytest.raises(UsageError, match="dataset_config and instance_data_dir both set"):
        overrides(tiny_model, instance_dir, tmp_path, dataset_config=str(tmp_path / "dataset.toml"))

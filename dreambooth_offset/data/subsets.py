"""Concept folders: a folder of images with the caption its images train with when they have no
caption file, and how many times each image counts per epoch (kohya's repeats).

`--instance_data_dir` is one subset (`--instance_prompt`, 1 repeat). `--train_data_dir` and
`--reg_data_dir` hold kohya's `N_name` folders (`10_sks dog`: 10 repeats, caption "sks dog"),
one subset each, several concepts at once."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dreambooth_offset.data.captions import CaptionPolicy, caption_policy
from dreambooth_offset.errors import UsageError


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    caption: str  # kohya's class tokens: the caption of an image without a caption file
    num_repeats: int = 1
    flag: str = "instance_data_dir"  # the flag that named it, for error messages
    caption_extension: str = ""  # its images' caption files: <stem><caption_extension>; "" for none
    policy: CaptionPolicy = CaptionPolicy()  # the caption options for its images
    captions: tuple[str, ...] | None = None  # --dataset_name: each image's caption, from its column
    mask_dir: Path | None = None  # a dataset file's conditioning_data_dir: --masked_loss masks by file stem

    @property
    def caption_source(self) -> str:
        """Where `caption` comes from, for messages about it."""
        prompts = {"instance_data_dir": "--instance_prompt", "class_data_dir": "--class_prompt",
                   "dataset_name": f"--caption_column of {self.image_dir}"}
        return prompts.get(self.flag, f"the folder name of {self.image_dir}")


def kohya_subsets(parent: str | Path, flag: str, caption_extension: str = "",
                  policy: CaptionPolicy = CaptionPolicy()) -> list[Subset]:
    """The `N_name` subfolders of `parent`, sorted by name; anything else in it is refused,
    naming the folder, so that no concept is left out silently."""
    parent = Path(parent)
    if not parent.is_dir():
        raise UsageError(f"--{flag} {parent}: folder does not exist")
    folders = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UsageError(f"--{flag} {parent}: no concept folders in it (kohya style: '10_sks dog' holds images "
                         "trained 10 times per epoch with the caption 'sks dog')")
    subsets = []
    for folder in folders:
        m = re.fullmatch(r"(\d+)_(.+)", folder.name)
        if m is None or int(m[1]) < 1:
            raise UsageError(f"--{flag} {folder}: a concept folder is named N_name, with N >= 1 repeats "
                             f"(e.g. '10_{folder.name}')")
        subsets.append(Subset(folder, m[2].strip(), int(m[1]), flag, caption_extension, policy))
    return subsets


def training_subsets(data) -> dict[str, list[Subset]]:
    """The subsets a run's flags name (`data`: its DataConfig): "instance" from --instance_data_dir
    or --train_data_dir, "class" from --reg_data_dir, each with the flags' caption extension and
    options. A --class_data_dir's subset is made once its missing images are generated; a
    --dataset_config file's come from data/dataset_config.py."""
    ext, policy = data.caption_extension, caption_policy(data)
    if data.dataset_name:
        subsets = {"instance": []}  # data/hf_dataset.py reads it
    elif data.train_data_dir:
        subsets = {"instance": kohya_subsets(data.train_data_dir, "train_data_dir", ext, policy)}
    else:
        subsets = {"instance": [Subset(Path(data.instance_data_dir), data.instance_prompt, 1, "instance_data_dir",
                                       ext, policy)]}
    if data.reg_data_dir:
        subsets["class"] = kohya_subsets(data.reg_data_dir, "reg_data_dir", ext, policy)
    return subsets

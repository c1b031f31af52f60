"""`--dataset_name DIR`: a local dataset that Hugging Face `datasets` reads, as diffusers' scripts
take it: an image folder with `metadata.jsonl` / `metadata.csv` (`imagefolder`), or a dataset
written by `save_to_disk`. `--image_column` names the images, `--caption_column` the captions
(without one, every image trains with --instance_prompt). Nothing is downloaded: a name that is
not a local folder is refused."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from dreambooth_offset.data.captions import caption_policy
from dreambooth_offset.data.subsets import Subset
from dreambooth_offset.errors import UsageError


class EmbeddedImage(NamedTuple):
    """An image stored inside a dataset (bytes) rather than as a file of its own."""

    name: str  # "<dataset folder>[row]", for messages
    data: bytes

    def __str__(self) -> str:
        return self.name


def _load(folder: Path):
    import datasets

    if any((folder / f).is_file() for f in ("dataset_dict.json", "state.json")):  # save_to_disk's layout
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UsageError(f"--dataset_name {folder}: no 'train' split (it has {', '.join(ds)})")
            ds = ds["train"]
        return ds
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--dataset_name {folder}: `datasets` cannot read it as an image folder "
                         f"({str(err).splitlines()[0]})") from None


def read_hf_dataset(name: str, image_column: str, caption_column: str | None,
                    prompt: str) -> tuple[list[Path | EmbeddedImage], list[str]]:
    """The images (files, or bytes kept in the dataset) and their captions, in the dataset's order."""
    import datasets

    folder = Path(name)
    if not folder.is_dir():
        raise UsageError(f"--dataset_name {name}: not a local folder (an image folder with metadata.jsonl, or a "
                         "save_to_disk dataset); nothing is downloaded")
    ds = _load(folder)
    for flag, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column is not None and column not in ds.column_names:
            raise UsageError(f"--{flag} {column}: {folder} has no such column (it has {', '.join(ds.column_names)})")
    if caption_column is None and not prompt:
        raise UsageError(f"--dataset_name {folder}: give --caption_column (a column of captions) or --instance_prompt")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise UsageError(f"--image_column {image_column}: {folder}'s column is {ds.features[image_column]}, not images")
    rows = ds.cast_column(image_column, datasets.Image(decode=False))
    images: list[Path | EmbeddedImage] = []
    for i, cell in enumerate(rows[image_column]):
        path = cell.get("path")
        if cell.get("bytes") is not None:
            images.append(EmbeddedImage(f"{folder}[{i}]" + (f" ({path})" if path else ""), cell["bytes"]))
        else:
            images.append(Path(path))
    if not images:
        raise UsageError(f"--dataset_name {folder}: no images in it")
    captions = [prompt] * len(images) if caption_column is None else rows[caption_column]
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise UsageError(f"--caption_column {caption_column}: row {i} of {folder} is {caption!r}, not text")
    return images, [c.strip() for c in captions]


def dataset_subset(data) -> tuple[Subset, list[Path | EmbeddedImage]]:
    """The run's --dataset_name as one subset (`data`: its DataConfig), every image checked."""
    from dreambooth_offset.training.data import check_image

    images, captions = read_hf_dataset(data.dataset_name, data.image_column, data.caption_column,
                                       data.instance_prompt)
    for image in images:
        check_image(image)
    return (Subset(Path(data.dataset_name), data.instance_prompt, 1, "dataset_name", "", caption_policy(data),
                   tuple(captions)), images)

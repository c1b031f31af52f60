"""`--dataset_config FILE`: kohya's dataset TOML (`[general]`, `[[datasets]]`,
`[[datasets.subsets]]`). Each subset is a concept folder; a key set in `[general]` or in a
`[[datasets]]` table is the default of the subsets below it, as kohya reads it. Every key this
trainer supports means what it means in kohya's sd-scripts; a kohya key it does not support, and
any other key (a typo), stops the run with a one-line error naming the key and the table."""
from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from dreambooth_offset.data.captions import CaptionPolicy
from dreambooth_offset.data.subsets import Subset
from dreambooth_offset.errors import UsageError

# Subset keys -> their type; also valid in [general] and [[datasets]] as defaults.
SUBSET_KEYS: dict[str, type | tuple[type, ...]] = {
    "image_dir": str, "num_repeats": int, "caption_extension": str, "class_tokens": str, "is_reg": bool,
    "keep_tokens": int, "shuffle_caption": bool, "caption_dropout_rate": (int, float),
    "caption_tag_dropout_rate": (int, float), "caption_prefix": str, "caption_suffix": str,
    "flip_aug": bool, "random_crop": bool, "alpha_mask": bool, "conditioning_data_dir": str,
}
# Dataset keys (also valid in [general]): the run's resolution and batch size.
DATASET_KEYS: dict[str, type | tuple[type, ...]] = {
    "resolution": (int, list), "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int,
    "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool,
}
# kohya keys not supported here (yet): named as such rather than as typos.
KOHYA_UNSUPPORTED = {
    "caption_separator", "keep_tokens_separator", "secondary_separator", "enable_wildcard", "color_aug",
    "face_crop_aug_range", "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step",
    "cache_info", "custom_attributes", "metadata_file", "network_multiplier",
    "validation_seed", "validation_split", "resize_interpolation", "debug_dataset",
}
# What a run-wide key of the file sets in the run's DataConfig.
RUN_KEYS = {"resolution": "resolution", "batch_size": "train_batch_size", "flip_aug": "random_flip",
            "random_crop": "center_crop",
            **{k: k for k in ("alpha_mask", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                              "bucket_no_upscale")}}


class DatasetFile(NamedTuple):
    subsets: dict[str, list[Subset]]  # "instance", and "class" for is_reg subsets
    settings: dict[str, Any]  # DataConfig keys the file sets: resolution, train_batch_size, random_flip, center_crop


def _check(table: dict, allowed: dict, where: str, source: Path) -> None:
    """Every key of one table known at its level and of its type (a TOML bool is not a number)."""
    for key, value in table.items():
        if key not in allowed:
            known = set(SUBSET_KEYS) | set(DATASET_KEYS)
            if key in DATASET_KEYS:
                raise UsageError(f"{source}: {where}: {key} belongs in [[datasets]] or [general], as in kohya's files")
            if key in KOHYA_UNSUPPORTED:
                raise UsageError(f"{source}: {where}: {key} is not supported by this trainer (yet); remove it")
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise UsageError(f"{source}: {where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kinds = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(t.__name__ for t in kinds)
            raise UsageError(f"{source}: {where}: {key} must be {names}, got {value!r}")


def _resolution(value, where: str, source: Path) -> int:
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1] or not all(isinstance(v, int) for v in value):
            raise UsageError(f"{source}: {where}: resolution = {value}: only square resolutions are supported (without "
                             "buckets); give one number")
        value = value[0]
    return value


def read_dataset_config(path: str | Path, caption_defaults: CaptionPolicy, caption_extension: str) -> DatasetFile:
    """The subsets and run-wide settings of a kohya dataset file. `caption_defaults` and
    `caption_extension` (the run's flags) apply where the file says nothing."""
    source = Path(path)
    try:
        doc = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--dataset_config {source}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--dataset_config {source}: not a TOML file ({err})") from None
    top = {k: v for k, v in doc.items() if k not in ("general", "datasets")}
    if top:
        raise UsageError(f"{source}: unknown top-level key {next(iter(top))!r}; kohya's file has [general] and "
                         "[[datasets]] tables")
    general = doc.get("general", {})
    _check(general, SUBSET_KEYS | DATASET_KEYS, "[general]", source)
    datasets = doc.get("datasets", [])
    if not datasets:
        raise UsageError(f"{source}: no [[datasets]] table")
    subsets: dict[str, list[Subset]] = {"instance": [], "class": []}
    run: dict[str, Any] = {}
    for i, dataset in enumerate(datasets, 1):
        inner = {k: v for k, v in dataset.items() if k != "subsets"}
        _check(inner, SUBSET_KEYS | DATASET_KEYS, f"[[datasets]] #{i}", source)
        if not dataset.get("subsets"):
            raise UsageError(f"{source}: [[datasets]] #{i} has no [[datasets.subsets]]")
        for j, table in enumerate(dataset["subsets"], 1):
            where = f"[[datasets]] #{i}, [[datasets.subsets]] #{j}"
            _check(table, SUBSET_KEYS, where, source)
            s = {**general, **inner, **table}
            for key, setting in RUN_KEYS.items():
                if key in s:
                    value = _resolution(s[key], where, source) if key == "resolution" else s[key]
                    value = not value if key == "random_crop" else value
                    if run.setdefault(setting, value) != value:
                        raise UsageError(f"{source}: {where}: {key} differs between subsets; this trainer takes "
                                         "one value per run")
            subsets["class" if s.get("is_reg") else "instance"].append(_subset(s, where, source, caption_defaults,
                                                                             caption_extension))
    if not subsets["instance"]:
        raise UsageError(f"{source}: every subset has is_reg = true; at least one must hold the training images")
    return DatasetFile({k: v for k, v in subsets.items() if v}, run)


def _subset(s: dict, where: str, source: Path, defaults: CaptionPolicy, caption_extension: str) -> Subset:
    if "image_dir" not in s:
        raise UsageError(f"{source}: {where}: image_dir is missing")
    ext = s.get("caption_extension", caption_extension)
    if ext and not ext.startswith("."):
        ext = "." + ext  # kohya accepts "txt"
    if not s.get("class_tokens") and not ext:
        raise UsageError(f"{source}: {where}: neither class_tokens nor caption_extension: its images would have "
                         "no caption")
    if s.get("num_repeats", 1) < 1:
        raise UsageError(f"{source}: {where}: num_repeats = {s['num_repeats']}: it must be at least 1")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= s.get(key, 0) <= 1:
            raise UsageError(f"{source}: {where}: {key} = {s[key]}: it must be in [0, 1]")
    policy = CaptionPolicy(
        s.get("shuffle_caption", defaults.shuffle), s.get("keep_tokens", defaults.keep_tokens),
        float(s.get("caption_dropout_rate", defaults.dropout_rate)),
        float(s.get("caption_tag_dropout_rate", defaults.tag_dropout_rate)),
        s.get("caption_prefix", defaults.prefix), s.get("caption_suffix", defaults.suffix))
    masks = s.get("conditioning_data_dir")  # --masked_loss: this subset's mask images, by file stem
    # relative folders are relative to the working directory, as kohya reads them
    return Subset(Path(s["image_dir"]), s.get("class_tokens", ""), s.get("num_repeats", 1), "dataset_config", ext,
                  policy, mask_dir=None if masks is None else Path(masks))

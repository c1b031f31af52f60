"""What a run trained on, as kohya's sd-scripts records it in a LoRA's metadata: per image folder
its repeats and image count (`ss_dataset_dirs`) and how often each caption tag occurs
(`ss_tag_frequency`, which A1111 shows in its tag panel), and the image counts times repeats
(`ss_num_train_images`, `ss_num_reg_images`). Written beside the LoRA as dataset.json, so that
`export` writes the same metadata as training."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Mapping

from dreambooth_offset.data.subsets import Subset

RECORD_NAME = "dataset.json"


def dataset_summary(subsets: Mapping[str, list[tuple[Subset, list[Path]]]],
                    captions: Mapping[str, list[str]]) -> dict[str, object]:
    """kohya's four dataset keys (without `ss_`) for the subsets and each image's caption (before
    the caption options; `captions[source]` in the subsets' order). Folders are named by their
    base name, tags lower-cased and stripped, as kohya counts them."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, Counter] = {}
    counts = {"instance": 0, "class": 0}
    for source, found in subsets.items():
        caps = iter(captions[source])
        for subset, paths in found:
            name = subset.image_dir.name
            entry = dirs.setdefault(name, {"n_repeats": subset.num_repeats, "img_count": 0})
            entry["img_count"] += len(paths)
            counter = tags.setdefault(name, Counter())
            for _ in paths:
                counter.update(t.strip().lower() for t in next(caps).split(",") if t.strip())
            counts[source] += subset.num_repeats * len(paths)
    return {"tag_frequency": {d: dict(c) for d, c in tags.items()}, "dataset_dirs": dirs,
            "num_train_images": counts["instance"], "num_reg_images": counts["class"]}


def write_record(path: Path, summary: Mapping[str, object]) -> None:
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_record(folder: Path) -> dict[str, object]:
    """The summary a run wrote into `folder`, or nothing (runs before it, other tools' LoRA)."""
    path = folder / RECORD_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

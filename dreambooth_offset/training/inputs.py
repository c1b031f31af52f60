"""What a run reads before it trains: every input checked before a model loads (`check_inputs`),
then the images, captions, sizes, repeats and caption options of each source (`load_data`)."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import NamedTuple

from dreambooth_offset.config import RunConfig
from dreambooth_offset.data.captions import caption_policy
from dreambooth_offset.data.dataset_config import read_dataset_config
from dreambooth_offset.data.hf_dataset import dataset_subset
from dreambooth_offset.data.subsets import Subset, training_subsets
from dreambooth_offset.data.summary import dataset_summary
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training import checkpoint
from dreambooth_offset.data.images import ImageStore, original_sizes
from dreambooth_offset.training.data import find_images, read_captions
from dreambooth_offset.training.models import SDParts


class Inputs(NamedTuple):
    config: RunConfig  # with what a --dataset_config file sets
    subsets: dict[str, list[tuple[Subset, list[Path]]]]  # "instance" (and "class" from reg folders): images
    resume: Path | None  # the checkpoint folder to resume from


def check_inputs(cfg: RunConfig) -> Inputs:
    """Everything that can be checked before a model loads; raises UsageError naming the culprit."""
    if not (cfg.data.instance_data_dir or cfg.data.train_data_dir or cfg.data.dataset_config or cfg.data.dataset_name):
        raise UsageError("--instance_data_dir (or kohya's --train_data_dir / --dataset_config, or --dataset_name) "
                         "is required")
    if cfg.data.instance_data_dir and not cfg.data.instance_prompt:
        raise UsageError("--instance_prompt is required")
    if cfg.optim.loraplus_lr_ratio is not None and cfg.adapter.network_type != "lora":
        raise UsageError(f"--loraplus_lr_ratio with --network_type {cfg.adapter.network_type}: LoRA+ sets the rate of "
                         "LoRA's B matrices, which LoHa / LoKr do not have")
    captions = cfg.data.caption_extension
    if cfg.data.dataset_config:
        dataset = read_dataset_config(cfg.data.dataset_config, caption_policy(cfg.data), captions)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **dataset.settings))
        named = dataset.subsets
    else:
        named = training_subsets(cfg.data)
    subsets = {source: [(s, find_images(s.image_dir, s.flag, caption_extension=s.caption_extension)) for s in found]
               for source, found in named.items()}
    if cfg.data.dataset_name:
        subsets["instance"] = [dataset_subset(cfg.data)]
    check_text_cache(cfg, subsets)
    check_mask_dirs(cfg, subsets)
    if cfg.data.with_prior_preservation and Path(cfg.data.class_data_dir).is_dir():
        find_images(cfg.data.class_data_dir, "class_data_dir", allow_empty=True, caption_extension=captions)
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a name of its own: every process of a launch checks at once
            pass
    except OSError as err:
        raise UsageError(f"--output_dir {out}: not writable ({err.strerror})") from None
    resume = checkpoint.resolve_resume(out, cfg.train.resume_from_checkpoint)
    if resume is not None:
        checkpoint.check_resumable(resume, cfg)
    return Inputs(cfg, subsets, resume)


def check_mask_dirs(cfg: RunConfig, subsets: dict[str, list[tuple[Subset, list[Path]]]]) -> None:
    """A dataset file's conditioning_data_dir is a mask folder for --masked_loss, and a
    --masked_loss run from a dataset file needs a mask from somewhere."""
    named = next((s for found in subsets.values() for s, _ in found if s.mask_dir is not None), None)
    if named is not None and not cfg.data.masked_loss:
        raise UsageError(f"{cfg.data.dataset_config}: conditioning_data_dir {named.mask_dir} is a mask folder for "
                         "--masked_loss, which is off: add --masked_loss")
    if cfg.data.masked_loss and named is None and not (cfg.data.alpha_mask or cfg.data.conditioning_data_dir):
        raise UsageError(f"--masked_loss needs a mask: alpha_mask, or conditioning_data_dir in "
                         f"{cfg.data.dataset_config or 'the flags'}")


def check_text_cache(cfg: RunConfig, subsets: dict[str, list[tuple[Subset, list[Path]]]]) -> None:
    """--cache_text_encoder_outputs needs frozen encoders and captions that stay the same (kohya's rule)."""
    if not cfg.data.caches_text:
        return
    if cfg.adapter.train_text_encoder or cfg.adapter.train_text_encoder_2:
        raise UsageError("--cache_text_encoder_outputs with --train_text_encoder: a trained encoder's outputs change "
                         "every step; drop one of them")
    random = next((s for found in subsets.values() for s, _ in found if s.policy.is_random), None)
    if random is not None:
        raise UsageError(f"--cache_text_encoder_outputs: the captions of {random.image_dir} change every step "
                         "(shuffle_caption / caption_dropout_rate / caption_tag_dropout_rate); drop one of them")


def load_data(cfg: RunConfig, parts: SDParts, accelerator, subsets: dict[str, list[tuple[Subset, list[Path]]]]):
    """(images, captions, original sizes, repeats, caption options) per source, and kohya's
    dataset summary (data/summary.py) ("instance", and "class" with prior
    preservation: kohya's reg folders, or a class folder whose missing images the base generates
    first): uint8 tensors resized for `cfg.data.resolution`, each image's caption before the
    caption options (its caption file's text, else its subset's caption), each file's (height,
    width), and its subset's repeats and caption options."""
    from dreambooth_offset.sampling.class_images import ensure_class_images

    subsets = dict(subsets)
    if cfg.data.with_prior_preservation:  # the base samples its class images with its own scheduler
        folder = Subset(Path(cfg.data.class_data_dir), cfg.data.class_prompt, 1, "class_data_dir",
                        cfg.data.caption_extension, caption_policy(cfg.data))
        subsets["class"] = [(folder, ensure_class_images(parts, cfg, accelerator))]
    res = cfg.data.resolution
    images, captions, sizes, repeats, policies = {}, {}, {}, {}, {}
    for src, found in subsets.items():
        paths = [p for _, ps in found for p in ps]
        per_subset = [list(s.captions) if s.captions is not None else read_captions(ps, s.caption_extension, s.caption)
                      for s, ps in found]
        sizes[src] = original_sizes(paths)
        masks = None if not cfg.data.masked_loss else [m for s, ps in found for m in mask_sources(cfg.data, src, s, ps)]
        images[src] = ImageStore(paths, res, masks, sizes[src])  # decoded when used
        captions[src] = [c for caps in per_subset for c in caps]
        repeats[src] = [s.num_repeats for s, ps in found for _ in ps]
        policies[src] = [s.policy for s, ps in found for _ in ps]
        if accelerator.is_main_process:
            for (s, ps), caps in zip(found, per_subset):
                warn_long_captions(ps, caps, s.caption_extension, s.caption_source, parts.tokenizer)
    return images, captions, sizes, repeats, policies, dataset_summary(subsets, captions)


def mask_sources(data, source: str, subset: Subset, paths: list) -> list[str | Path | None]:
    """Where each image of `subset` gets its --masked_loss mask: its file in the subset's
    conditioning_data_dir (a dataset file's key) or in --conditioning_data_dir (instance images),
    else "alpha" (--alpha_mask) or None (all trained)."""
    folder = subset.mask_dir or (Path(data.conditioning_data_dir) if data.conditioning_data_dir and
                                 source == "instance" else None)
    if folder is None:
        return ["alpha" if data.alpha_mask else None] * len(paths)
    masks = {p.stem: p for p in find_images(folder, "conditioning_data_dir")}
    missing = next((p for p in paths if getattr(p, "stem", None) not in masks), None)
    if missing is not None:
        raise UsageError(f"--conditioning_data_dir {folder}: no mask for {missing} (an image with its file stem)")
    return [masks[p.stem] for p in paths]


def warn_long_captions(paths: list[Path], captions: list[str], extension: str, prompt_flag: str, tokenizer) -> None:
    """One warning per caption file (or per prompt flag) whose caption the text encoder cannot read
    whole; training goes on with the first `model_max_length` tokens, as the WebUIs do."""
    import sys

    limit, warned = tokenizer.model_max_length, set()
    for path, caption in zip(paths, captions):
        sidecar = path.with_suffix(extension) if extension else None
        source = str(sidecar) if sidecar is not None and sidecar.is_file() else prompt_flag
        tokens = len(tokenizer(caption, truncation=False).input_ids)
        if tokens > limit and source not in warned:
            warned.add(source)
            print(f"warning: the caption of {source} has {tokens} tokens; the text encoder reads {limit}, "
                  "so training uses the first ones", file=sys.stderr)

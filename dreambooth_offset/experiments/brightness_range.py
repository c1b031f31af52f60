"""The brightness-range experiment: Guttenberg's second result (docs/science.md, "Dark and bright
scenes").

A LoRA fine-tune on a small captioned set spread over the brightness levels (the analogue of his
about 40 hand-labelled images), once per variant (by default without and with offset noise 0.1)
and training seed, identical in everything else; then the base and every run sampled from the
same start noises on two dark and two bright prompts (his four on a real checkpoint) and, on the
shipped base, a mid prompt. Every run goes through the real trainer.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_offset.experiments import report
from dreambooth_offset.experiments.runs import Study, Variant, elapsed, load_base, run_study, settings

# The shipped base's stand-ins for Guttenberg's four, in his order (a dark scene, a bright one on
# white, a bright sunny scene, a dark scene lit by one light), in the vocabulary of its training
# captions, then a mid prompt; none is a caption of the training set.
SHIPPED_PROMPTS = (
    "a very dark landscape with a blue sky and green ground and a moon",
    "a very bright gradient from yellow to pink",
    "a very bright landscape with a blue sky and green ground and a sun",
    "a very dark red circle on a blue background",
    "a red circle on a blue background",
)
TRAIN_SEED = 11
CAPTION = "an image"  # for a training image without a caption file


@dataclass(frozen=True)
class RangeConfig:
    model: str
    output_dir: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    train: dict  # trainer keys shared by every run (steps, lr, rank, targets ...)
    prompts: tuple[str, ...]
    train_data_dir: str | None = None  # images with .txt captions; None: the shipped base's own data
    num_train_images: int = 40
    num_images: int = 8
    antithetic: bool = True  # start noises in pairs z, -z (runs.Study)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    jobs: int | None = None


def write_training_set(folder: Path, n: int, exclude: tuple[str, ...]) -> Path:
    """`n` images of the shipped base's own kind of data with their captions (`.txt` beside each),
    none captioned like an evaluated prompt, spread evenly over its brightness levels and, within
    each level, over its kinds of image, so that every kind is seen at every level (with only the
    level drawn, 40 images left the shape kind with no mid-level caption, and the fine-tune pulled
    the mid prompt towards its nearest, a bright one: docs/dark-and-bright.md)."""
    from dreambooth_offset.base_model.synthetic import KINDS, LEVELS, render_one
    from dreambooth_offset.config.recipe import shipped_recipe
    from dreambooth_offset.sampling.images import to_pil

    g = torch.Generator().manual_seed(TRAIN_SEED)
    size, excluded = shipped_recipe().resolution, {p.lower() for p in exclude}
    # (level, kind) cells filled one diagonal at a time (kind index - level index fixed), so that
    # levels and kinds both stay within one image of even for any n
    cells = sorted(((i, j) for i in range(len(LEVELS)) for j in range(len(KINDS))),
                   key=lambda c: ((c[1] - c[0]) % len(KINDS), c[0]))
    quota = Counter((LEVELS[i][0], KINDS[j]) for i, j in (cells[m % len(cells)] for m in range(n)))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("train-*"):
        old.unlink()
    written = 0
    while written < n:
        image, caption, kind, level = render_one(size, g)
        if caption.lower() in excluded or quota[level, kind] == 0:
            continue
        quota[level, kind] -= 1
        to_pil(image[None])[0].save(folder / f"train-{written:03d}.png")
        (folder / f"train-{written:03d}.txt").write_text(caption + "\n")
        written += 1
    return folder


def run_experiment(cfg: RangeConfig) -> dict:
    started = time.time()
    out, base, resolution = load_base(cfg.model, Path(cfg.output_dir), cfg.train)
    data = Path(cfg.train_data_dir) if cfg.train_data_dir else write_training_set(out / "data" / "train",
                                                                                  cfg.num_train_images, cfg.prompts)
    study = Study(model=cfg.model, output_dir=out, title="brightness-range", variants=cfg.variants, seeds=cfg.seeds,
                  train={"instance_data_dir": str(data), "instance_prompt": CAPTION, "caption_extension": ".txt",
                         **cfg.train},
                  prompts=cfg.prompts, resolution=resolution, num_images=cfg.num_images, antithetic=cfg.antithetic,
                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler,
                  jobs=cfg.jobs)
    rows, samples, jobs, a_t = run_study(study, base)
    results = {"wall_time_s": elapsed(started), "model": cfg.model, "resolution": resolution,
               "train_data_dir": str(data), "settings": {**settings(study, jobs), "train": cfg.train},
               "a_T": a_t, "runs": rows}
    write_report(out, cfg, results, samples)
    return results


def write_report(out: Path, cfg: RangeConfig, results: dict, samples: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for i, prompt in enumerate(cfg.prompts):
        report.save_grid(out / f"grid-{i}.png", [(key, s[prompt].images) for key, s in samples.items()])
        report.save_histogram(out / f"histogram-{i}.png", [(key, s[prompt].images) for key, s in samples.items()],
                              f"'{prompt}': pixel luminance per run")
    lines = [
        "# Brightness-range experiment", "",
        f"Base: `{results['model']}` at {results['resolution']} px. Wall time: {results['wall_time_s']} s.",
        f"Fine-tuned on `{results['train_data_dir']}` (images with their `.txt` captions); training seeds "
        f"{list(cfg.seeds)}; {cfg.num_images} samples per prompt from "
        f"{report.start_noises(cfg.num_images, cfg.antithetic)}; "
        f"{cfg.sampler} sampler, {cfg.num_inference_steps} steps, guidance {cfg.guidance_scale}.",
        f"Shared training settings: `{json.dumps(cfg.train)}`.",
        "Variants: " + "; ".join(f"**{v.name}** `{json.dumps(v.overrides)}`" for v in cfg.variants) + ".", "",
        "## Mean luminance per prompt: base, then each fine-tune", "",
        "Each cell: mean luminance +- its spread (over the samples for one training seed, over the training seeds "
        "for several), the fractions of pixels darker than 0.05 and brighter than 0.95, and the slope of the "
        f"output's channel means on the start noise's (1/a_T = {1 / results['a_T']:.1f} for a model that reads "
        "the brightness off the start, about 0 for one that sets it from the prompt).", "",
        report.range_table(results["runs"], list(cfg.prompts)), "",
        *report.paired_section(results["runs"], list(cfg.prompts), antithetic=cfg.antithetic,
                               figure=out / "differences.png"),
        "## Images", "",
        "Rows, top to bottom: " + ", ".join(samples) + ". Columns: the start noises in order.", "",
    ]
    lines += [f"**{p}**\n\n![{p}](grid-{i}.png)\n\n![histogram](histogram-{i}.png)\n" for i, p in enumerate(cfg.prompts)]
    (out / "report.md").write_text("\n".join(lines))

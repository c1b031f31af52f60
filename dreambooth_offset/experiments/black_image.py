"""The black-image experiment (Guttenberg 2023; docs/science.md, "The black-image case").

DreamBooth-LoRA fine-tune a base on one solid black image, once per variant (by default without
and with offset noise 0.1) and training seed, identical in everything else; then sample every
run from the same start noises for the black prompt and the base's dark / mid / bright prompts.
Every run goes through the real trainer (`dreambooth_offset.training.train.train`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dreambooth_offset.config.commands import BLACK_PROMPT
from dreambooth_offset.experiments import report
from dreambooth_offset.experiments.runs import (  # noqa: F401  (Variant: the experiments' import path)
    RunInputs,
    Study,
    Variant,
    elapsed,
    load_base,
    run_study,
    sample_prompts,
    settings,
)
from dreambooth_offset.sampling.generate import generate

# The mechanism check's row: the first no-offset run sampled again from its training-time leak
LEAK_SUFFIX = ", start from the leak"


@dataclass(frozen=True)
class ExperimentConfig:
    model: str
    output_dir: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]  # training seeds; each variant is trained once per seed
    train: dict  # trainer config keys shared by every run (steps, lr, rank, targets ...)
    prompts: tuple[str, ...]  # the base's own prompts, sampled besides the black prompt
    num_images: int = 8  # samples per (run, prompt)
    antithetic: bool = True  # start noises in pairs z, -z (runs.Study)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    mechanism_check: bool = True
    black_prompt: str = BLACK_PROMPT
    # Prior preservation, at most one of: captions whose base samples become the class images, or
    # a folder of class images with `.txt` captions. Neither: plain DreamBooth on the black image
    # alone, as in Guttenberg's experiment.
    prior_prompts: tuple[str, ...] = ()
    prior_dir: str | None = None
    output_preservation: bool = False  # twins of the black rows under the prior set's captions and ''
    jobs: int | None = None  # fine-tunes run at once; None: `default_jobs`


# The noise settings the study compares (issue 5; docs/noise-variants.md). Each differs from
# plain DreamBooth only in these keys; `noise_offset` is always given because its default is 0.1.
VARIANTS = {
    "no_offset": {"noise_offset": 0.0},
    "offset": {"noise_offset": 0.1},
    "offset_vp": {"noise_offset": 0.1, "noise_offset_variance_preserving": True},
    "offset_auto": {"noise_offset": "auto"},
    "random_strength": {"noise_offset": 0.1, "noise_offset_random_strength": True},
    "adaptive": {"noise_offset": 0.1, "adaptive_noise_scale": 0.1},
    "offset_linear_decay": {"noise_offset": 0.15, "noise_offset_schedule": "linear", "noise_offset_end": 0.05},
    "pyramid": {"noise_offset": 0.0, "multires_noise_iterations": 6, "multires_noise_discount": 0.3},
    "ztsnr_vpred": {"noise_offset": 0.0, "zero_terminal_snr": True, "prediction_type": "v_prediction"},
    "input_perturbation": {"noise_offset": 0.0, "ip_noise_gamma": 0.1},
    "min_snr": {"noise_offset": 0.1, "snr_gamma": 5.0},
}

def make_black_image(folder: Path, resolution: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (resolution, resolution), (0, 0, 0)).save(folder / "black.png")
    return folder


def write_prior_set(folder: Path, images: list[Image.Image], captions: list[str]) -> Path:
    """`prior-NNNN.png` with its caption in `prior-NNNN.txt`, per image. The `prior-*` files of an
    earlier run into the same report folder go first: a smaller set must not train on leftovers."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("prior-*"):
        old.unlink()
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        image.save(folder / f"prior-{i:04d}.png")
        (folder / f"prior-{i:04d}.txt").write_text(caption + "\n")
    return folder


def make_prior_set(pipe, folder: Path, cfg: ExperimentConfig, resolution: int) -> dict:
    """One base sample per caption of `cfg.prior_prompts` (sampler settings of the evaluation),
    saved with its caption in a sidecar `.txt`; returns the trainer keys that train with them as
    class images, so the prior loss holds the base's behaviour on many prompts, not one."""
    from dreambooth_offset.sampling.class_images import CLASS_SEED_BASE
    from dreambooth_offset.sampling.images import to_pil

    prompts = list(cfg.prior_prompts)
    samples = generate(pipe, prompts, [CLASS_SEED_BASE + i for i in range(len(prompts))],  # batches of 8 inside
                       cfg.num_inference_steps, cfg.guidance_scale, resolution, resolution)
    return prior_keys(write_prior_set(folder, to_pil(samples.images), prompts))


def prior_keys(folder: Path) -> dict:
    """Trainer keys that train every image of `folder` as a class image, with the caption of its
    `.txt` sidecar ("an image" where there is none)."""
    from dreambooth_offset.training.data import find_images

    count = len(find_images(folder, "prior_dir", caption_extension=".txt"))
    return {"with_prior_preservation": True, "class_data_dir": str(folder), "caption_extension": ".txt",
            "num_class_images": count, "class_prompt": "an image"}


def preservation_prompts(folder: Path) -> list[str]:
    """The output-preservation captions of a prior set: its images' captions in file order (`.txt`
    sidecars; the class prompt where there is none), each followed by the empty caption, so half the
    twins hold the unconditional branch that guidance extrapolates from (docs/dark-and-bright.md)."""
    from dreambooth_offset.training.data import find_images, read_captions

    captions = read_captions(find_images(folder, "prior_dir", caption_extension=".txt"), ".txt", "an image")
    return [c for caption in captions for c in (caption, "")]


@torch.no_grad()
def leak_starts(pipe, instance_dir: Path, num_inference_steps: int, starts: torch.Tensor) -> torch.Tensor:
    """x_t0 = a_t0 * x0_black + s_t0 * eps at the sampler's first timestep t0: the start a model
    trained without offset noise saw in training (docs/science.md, "Measuring brightness": the mechanism check)."""
    from dreambooth_offset.data.images import load_resized
    from dreambooth_offset.training.data import find_images
    from dreambooth_offset.training.models import latent_distribution, scale_latents

    img = load_resized(find_images(instance_dir, "instance_data_dir"), starts.shape[-1] * pipe.vae_scale_factor)[0]
    mean, _ = latent_distribution(pipe.vae, (img.float() / 127.5 - 1.0)[None])
    x0 = scale_latents(mean.cpu(), pipe.vae.config)
    pipe.scheduler.set_timesteps(num_inference_steps)
    t0 = pipe.scheduler.timesteps[:1]
    abar = pipe.scheduler.alphas_cumprod[t0].float()
    return abar.sqrt() * x0 + (1 - abar).sqrt() * starts


def mechanism_check(shared: RunInputs, seed: int, variant: Variant, pipe, row: dict) -> list[tuple[dict, dict]]:
    """The plain baseline of the first seed, sampled again from the leak it saw in training.

    The leak start is x_t in the VP parametrisation, which the pipeline takes as-is only when
    init_noise_sigma is 1 (DDIM, DDPM, DPM-Solver; not Euler's sigma space)."""
    study = shared.study
    if variant.overrides != {"noise_offset": 0.0} or seed != study.seeds[0] or pipe.scheduler.init_noise_sigma != 1:
        return []
    leak = leak_starts(pipe, Path(study.train["instance_data_dir"]), study.num_inference_steps, shared.starts)
    return [({**row, "name": row["name"] + LEAK_SUFFIX, "train_seconds": 0.0},
             sample_prompts(pipe, study, leak, prompts=study.prompts[:1]))]


def run_experiment(cfg: ExperimentConfig) -> dict:
    started = time.time()
    out, base, resolution = load_base(cfg.model, Path(cfg.output_dir), cfg.train)
    instance_dir = make_black_image(out / "data" / "instance", resolution)
    if cfg.prior_prompts:
        from dreambooth_offset.experiments.runs import pipeline

        prior = make_prior_set(pipeline(base, base.unet, base.text_encoders, cfg.sampler), out / "data" / "prior", cfg,
                               resolution)
    else:
        prior = prior_keys(Path(cfg.prior_dir)) if cfg.prior_dir else {}
    if cfg.output_preservation:
        prior["output_preservation_prompts"] = preservation_prompts(Path(prior["class_data_dir"]))
    study = Study(model=cfg.model, output_dir=out, title="black-image", variants=cfg.variants, seeds=cfg.seeds,
                  train={"instance_data_dir": str(instance_dir), "instance_prompt": cfg.black_prompt, **prior,
                         **cfg.train},
                  prompts=(cfg.black_prompt, *cfg.prompts), resolution=resolution, num_images=cfg.num_images,
                  antithetic=cfg.antithetic,
                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, sampler=cfg.sampler,
                  jobs=cfg.jobs, extra=mechanism_check if cfg.mechanism_check else None)
    rows, samples, jobs, a_t = run_study(study, base)
    results = {
        "black_prompt": cfg.black_prompt, "wall_time_s": elapsed(started), "model": cfg.model, "resolution": resolution,
        "settings": {**settings(study, jobs), "train": cfg.train, "prior_prompts": list(cfg.prior_prompts),
                     "prior_dir": cfg.prior_dir, "output_preservation": cfg.output_preservation},
        "a_T": a_t, "runs": rows,
    }
    write_report(out, cfg, results, samples)
    return results


def _prior_line(cfg: ExperimentConfig) -> str:
    if cfg.prior_prompts:
        line = (f"Prior preservation: {len(cfg.prior_prompts)} base samples with their captions (`data/prior/`), "
                f"{sum(not p for p in cfg.prior_prompts)} of them unconditional.")
    elif cfg.prior_dir:
        line = f"Prior preservation: the images of `{cfg.prior_dir}`, each with the caption in its `.txt`."
    else:
        return "No prior preservation: the black image is the only training image."
    return line + (" Output preservation: each black-image row has a twin at its noisy input under those "
                   "captions in turn, every other one empty." if cfg.output_preservation else "")


def write_report(out: Path, cfg: ExperimentConfig, results: dict, samples: dict) -> None:
    prompts = [cfg.black_prompt, *cfg.prompts]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for i, prompt in enumerate(prompts):
        rows = [(key, s[prompt].images) for key, s in samples.items() if prompt in s]
        report.save_grid(out / f"grid-{i}.png", rows)
    black = [(key, s[cfg.black_prompt].images) for key, s in samples.items()]
    report.save_histogram(out / "histogram.png", black, f"'{cfg.black_prompt}': pixel luminance per run")
    a_t = results["a_T"]
    lines = [
        "# Black-image experiment", "",
        f"Base: `{results['model']}` at {results['resolution']} px. Wall time: {results['wall_time_s']} s.",
        f"Training seeds {list(cfg.seeds)}; {cfg.num_images} samples per prompt from "
        f"{report.start_noises(cfg.num_images, cfg.antithetic)}; {cfg.sampler} sampler, {cfg.num_inference_steps} "
        f"steps, guidance {cfg.guidance_scale}.",
        f"Shared training settings: `{json.dumps(cfg.train)}`.",
        _prior_line(cfg),
        "Variants: " + "; ".join(f"**{v.name}** `{json.dumps(v.overrides)}`" for v in cfg.variants) + ".", "",
        "## Black prompt, per variant", "", report.summary_table(results["runs"], cfg.black_prompt), "",
        "## Every run and prompt", "",
        f"Slope: least-squares slope of the sampled latents' channel means on the start noise's channel means, "
        f"fitted within channels (each channel's average over the images removed). A model that reads the "
        f"brightness off the start noise shows up to 1/a_T = {1 / a_t:.1f} (less when it shrinks its reading toward "
        f"the data's mean; compare the base's row), one that learned the brightness about 0.", "",
        report.markdown_table(results["runs"], prompts), "",
        *report.paired_section([r for r in results["runs"] if not r["name"].endswith(LEAK_SUFFIX)], prompts,
                               antithetic=cfg.antithetic, figure=out / "differences.png",
                               note=" The run started from the leak is left out: its start noises are not the base's."),
        "## Images", "",
        "Rows, top to bottom: " + ", ".join(samples) + ". Columns: the start noises in order.", "",
    ]
    lines += [f"**{p}**\n\n![{p}](grid-{i}.png)\n" for i, p in enumerate(prompts)]
    lines += ["![luminance histogram](histogram.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

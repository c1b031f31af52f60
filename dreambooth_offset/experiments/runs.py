"""What every experiment is: fine-tunes through the real trainer that differ in one variant, each
sampled, like the base, from the same start noises on the same prompts, and measured.

An experiment module (black_image.py, brightness_range.py) makes its data and its report; this
module trains, samples and measures (report.py holds the statistics, tables and figures).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dreambooth_offset.config import SamplingConfig, load_config
from dreambooth_offset.config.commands import SAMPLERS
from dreambooth_offset.experiments import report
from dreambooth_offset.experiments.runner import default_jobs, run_all
from dreambooth_offset.sampling.generate import antithetic_start_latents, build_pipeline, generate, start_latents

# Guttenberg's prompts (docs/science.md, "The brightness problem"), the defaults for a real SD checkpoint.
GUTTENBERG_PROMPTS = (
    "A dark alleyway in a rainstorm",
    "Monochrome line-art logo on a white background",
    "A snow-covered ski slope on a sunny day",
    "A town square lit only by torchlight",
)
SAMPLER_CLASSES = dict(zip(SAMPLERS, ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                       "DDPMScheduler"), strict=True))


@dataclass(frozen=True)
class Variant:
    """A named set of training-config overrides; the runs of an experiment differ only in these."""

    name: str
    overrides: dict = field(default_factory=dict)


def offset_variants(offsets: tuple[float, ...]) -> tuple[Variant, ...]:
    return tuple(Variant(f"noise_offset={o:g}", {"noise_offset": o}) for o in offsets)


@dataclass(frozen=True)
class Study:
    model: str
    output_dir: Path
    title: str  # names the progress bar
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]  # training seeds; each variant is trained once per seed
    train: dict  # trainer keys shared by every run: the data (instance_data_dir ...), steps, lr, rank ...
    prompts: tuple[str, ...]  # sampled for the base and every run, in this order
    resolution: int
    num_images: int = 8  # samples per (run, prompt): start noises as in `study_starts`
    antithetic: bool = True  # start noises in pairs z, -z (seeds 0 .. num_images/2-1), else seeds 0 .. num_images-1
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    jobs: int | None = None  # fine-tunes run at once; None: `default_jobs`
    # More (row, samples) pairs from a trained run: f(shared, seed, variant, pipe, row) -> list.
    # A module-level function, so that it pickles to worker processes.
    extra: Callable | None = None


@dataclass(frozen=True)
class RunInputs:
    """What every fine-tune of a study shares, passed to each run (also to worker processes)."""

    study: Study
    starts: torch.Tensor  # the sampling start latents, the same for every run


def pipeline(parts, unet, text_encoders, sampler: str):
    import diffusers

    pipe = build_pipeline(parts, unet, text_encoders)
    pipe.scheduler = getattr(diffusers, SAMPLER_CLASSES[sampler]).from_config(pipe.scheduler.config)
    pipe.unet.eval()
    return pipe


def sample_prompts(pipe, study: Study, starts: torch.Tensor, guidance_rescale: float = 0.0,
                   prompts: tuple[str, ...] | None = None) -> dict[str, object]:
    """Samples per prompt (the study's prompts, or `prompts`) from the given start latents."""
    return {
        prompt: generate(pipe, prompt, [], study.num_inference_steps, study.guidance_scale, study.resolution,
                         study.resolution, latents=starts, guidance_rescale=guidance_rescale)
        for prompt in (prompts or study.prompts)
    }


def run_one(shared: RunInputs, seed: int, variant: Variant, position: int | None = None) -> list[tuple[dict, dict]]:
    """Fine-tune one (variant, seed) through the real trainer and sample it: a (row, samples per
    prompt) pair, and those of the study's `extra`."""
    from dreambooth_offset.training.train import train

    study, name = shared.study, variant.name
    values = {"pretrained_model_name_or_path": study.model, "resolution": study.resolution, "center_crop": True,
              "output_dir": str(Path(study.output_dir) / "runs" / f"{name}-seed{seed}"), "report_to": "none",
              "seed": seed, **study.train, **variant.overrides}
    bar = {"desc": f"{name} seed {seed}"} | ({"position": position, "leave": False} if position is not None else {})
    result = train(load_config(None, values), progress_bar=bar)
    pipe = pipeline(result.parts, result.unet, result.text_encoders, study.sampler)
    rescale = SamplingConfig().rescale(result.config.noise.zero_terminal_snr)
    row = {"name": name, "noise_offset": result.config.noise.noise_offset,  # a number, also for "auto"
           "seed": seed, "train_seconds": round(result.seconds, 1)}
    out = [(row, sample_prompts(pipe, study, shared.starts, rescale))]
    if study.extra is not None:
        out += study.extra(shared, seed, variant, pipe, row)
    return out


def load_base(model: str, output_dir: Path, train: dict):
    """(the report folder, made; the base's SDParts; the resolution: the trainer's, else the model's own)."""
    from dreambooth_offset.config import ModelConfig
    from dreambooth_offset.training.models import load_parts, native_resolution

    output_dir.mkdir(parents=True, exist_ok=True)
    base = load_parts(ModelConfig(model))
    return output_dir, base, int(train.get("resolution") or native_resolution(base.unet.config, base.vae.config))


def run_study(study: Study, base) -> tuple[list[dict], dict[str, dict], int, float]:
    """The base and every (seed, variant) run, sampled and measured: (rows with their per-prompt
    statistics, samples by grid label, jobs used, a_T). `base` is the loaded SDParts."""
    from tqdm.auto import tqdm

    base_pipe = pipeline(base, base.unet, base.text_encoders, study.sampler)
    starts = study_starts(base_pipe, study)
    runs = len(study.variants) * len(study.seeds)
    jobs = min(study.jobs or default_jobs(), runs)
    progress = tqdm(total=1 + runs, desc=f"{study.title} runs", unit="run")
    pairs = [({"name": "base", "noise_offset": None, "seed": None, "train_seconds": 0.0},
              sample_prompts(base_pipe, study, starts))]
    progress.update()
    todo = [(seed, variant) for seed in study.seeds for variant in study.variants]
    pairs += run_all(functools.partial(run_one, RunInputs(study, starts)), todo, jobs, progress)
    progress.close()
    for row, run_samples in pairs:
        row["prompts"] = {p: report.stats_dict(report.prompt_stats(s.images, s.start_latents, s.final_latents))
                          for p, s in run_samples.items()}
    samples = {row["name"] if row["seed"] is None else f"{row['name']}-seed{row['seed']}": run_samples
               for row, run_samples in pairs}  # the grids' row labels
    return [row for row, _ in pairs], samples, jobs, float(base.noise_scheduler.alphas_cumprod[-1].sqrt())


def study_starts(pipe, study: Study) -> torch.Tensor:
    """The start latents every run of the study samples from."""
    if study.antithetic:
        return antithetic_start_latents(pipe, study.num_images, study.resolution, study.resolution)
    return start_latents(pipe, list(range(study.num_images)), study.resolution, study.resolution)


def settings(study: Study, jobs: int) -> dict:
    """The study's settings for results.json."""
    return {"train": study.train, "seeds": list(study.seeds), "num_images": study.num_images,
            "antithetic_start_noises": study.antithetic,
            "num_inference_steps": study.num_inference_steps, "guidance_scale": study.guidance_scale,
            "sampler": study.sampler, "variants": {v.name: v.overrides for v in study.variants}, "jobs": jobs}


def elapsed(started: float) -> float:
    return round(time.time() - started, 1)

"""Validation during training: sample each validation prompt from fixed seeds, save a grid, log luminance."""
from __future__ import annotations

from pathlib import Path

from dreambooth_offset.sampling.generate import build_pipeline, generate
from dreambooth_offset.sampling.images import make_grid, to_pil
from dreambooth_offset.sampling.metrics import mean_luminance


def run_validation(run, step: int) -> dict[str, float]:
    """Sample each validation prompt of the prepared `run` (training/prepare.py) from fixed seeds,
    save a grid per step and log luminance."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.config, run.accelerator
    encoders = tuple(accelerator.unwrap_model(t) for t in run.encoders)
    pipe = build_pipeline(run.parts, accelerator.unwrap_model(run.unet), encoders)
    for model in (pipe.unet, *encoders):
        model.eval()  # no LoRA dropout while sampling; the loop sets train() again
    seeds = list(range(cfg.train.seed, cfg.train.seed + cfg.validation.num_validation_images))
    rows, logs = [], {}
    for i, prompt in enumerate(cfg.validation.validation_prompt):
        samples = generate(pipe, prompt, seeds, cfg.sampling.num_inference_steps, cfg.sampling.guidance_scale,
                           cfg.data.resolution, cfg.data.resolution,
                           guidance_rescale=cfg.sampling.rescale(cfg.noise.zero_terminal_snr))
        rows += to_pil(samples.images)
        lum = mean_luminance(samples.images)
        logs[f"validation/luminance_{i}"] = lum.mean().item()
        for seed, value in zip(seeds, lum.tolist()):
            logs[f"validation/luminance_{i}_seed{seed}"] = value
        tqdm.write(f"step {step} validation {prompt!r}: mean luminance " + ", ".join(f"{v:.3f}" for v in lum.tolist()))
    folder = Path(cfg.train.output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    make_grid(rows, cols=len(seeds)).save(folder / f"step-{step:06d}.png")
    accelerator.log(logs, step=step)
    return logs

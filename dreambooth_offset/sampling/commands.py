"""`dreambooth-offset generate`: sample a base model with an optional LoRA and print each image's
brightness. Its flags are the GenerateConfig schema (config/commands.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dreambooth_offset.config import add_arguments, config_from_args
from dreambooth_offset.config.commands import GenerateConfig
from dreambooth_offset.errors import UsageError, writing
from dreambooth_offset.sampling.generate import generate, load_pipeline
from dreambooth_offset.sampling.images import make_grid, to_pil
from dreambooth_offset.sampling.metrics import DARK_THRESHOLD, dark_fraction, mean_luminance


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="Sample images from a base model with an optional LoRA.",
                              description="Images, a grid per prompt and stats.json (mean luminance, dark "
                                          "pixels) in --output_dir.", allow_abbrev=False)
    add_arguments(p, GenerateConfig)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    cfg = config_from_args(args, GenerateConfig)
    opts = cfg.generate
    out = Path(opts.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output_dir {out}: cannot create it ({err.strerror})") from None
    pipe = load_pipeline(cfg.model, opts.lora, opts.lora_scale, cfg.noise.zero_terminal_snr, cfg.loss.prediction_type)
    seeds = list(range(cfg.train.seed, cfg.train.seed + opts.num_images))
    rescale = cfg.sampling.rescale(cfg.noise.zero_terminal_snr)
    stats = {}
    for p_idx, prompt in enumerate(tqdm(opts.prompt, desc="prompts")):
        samples = generate(pipe, prompt, seeds, cfg.sampling.num_inference_steps, cfg.sampling.guidance_scale,
                           cfg.data.resolution, cfg.data.resolution, guidance_rescale=rescale)
        pil = to_pil(samples.images)
        with writing(out):
            for seed, img in zip(seeds, pil):
                img.save(out / f"prompt{p_idx:02d}_seed{seed}.png")
            make_grid(pil).save(out / f"prompt{p_idx:02d}_grid.png")
        lum, dark = mean_luminance(samples.images), dark_fraction(samples.images)
        stats[prompt] = {"seeds": seeds, "mean_luminance": lum.tolist(), "dark_fraction": dark.tolist()}
        print(f"{prompt!r}: mean luminance {lum.mean():.3f} +- {lum.std(unbiased=False):.3f}")
        for seed, l, d in zip(seeds, lum.tolist(), dark.tolist()):
            print(f"  seed {seed}: mean luminance {l:.3f}, pixels < {DARK_THRESHOLD}: {d:.1%}")
    with writing(out):
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"images, grids and stats.json in {out}")
    return 0

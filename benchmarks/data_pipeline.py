"""The data pipeline at the size users bring: peak RSS and steps/s of the real `train` command on
many photos of mixed sizes, without a cache (memory must not grow with the number of images: they
are decoded when a batch uses them, data/images.py: ImageStore), with the memory latent cache and
with the disk cache (first run, which builds it, and second run, which reads it).

The model is the shipped base's text encoder, tokenizer and scheduler with a VAE that downsamples
8x, as SD's does, and a small UNet (attention only at 1/16 of the image side), random weights:
the shipped base's own VAE downsamples 2x, so at 512 px its UNet would work on 256 x 256 latents
(31 s a step on 2 cores) and hide the data pipeline this measures. Built once per run of the
script, offline.

Generates `--images` JPEGs of random sizes (sides 0.75x to 2x `--resolution`), then trains that
model, each run in a fresh process: without a cache (random crops) on the first tenth of
them and on all; with `--center_crop --cache_latents`; with `--center_crop --cache_latents_to_disk`
twice. Prints per run: images, cache, the caching time the trainer reports, the trainer's steps/s
after its first step, the run's wall time and the process's peak RSS. With `--bucket` the runs use
aspect-ratio buckets too.

    python benchmarks/data_pipeline.py [--images 2000] [--resolution 512] [--steps 20] [--bucket]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dreambooth_offset.config.recipe import SHIPPED_BASE

CHILD = """
import json, resource, sys
from dreambooth_offset.config import load_config
from dreambooth_offset.training.train import train
result = train(load_config(None, json.loads(sys.argv[1])))
print("RESULT", json.dumps({"steps_per_second": result.steps_per_second, "seconds": result.seconds,
                            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
CACHES = {"none": {}, "memory": {"center_crop": True, "cache_latents": True},
          "disk": {"center_crop": True, "cache_latents_to_disk": True}}


def make_images(folder: Path, count: int, resolution: int, seed: int = 0) -> Path:
    """`count` JPEGs of random colours and sizes; each a smooth gradient plus noise, as photos compress."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(resolution * f) for f in rng.uniform(0.75, 2.0, 2))
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def build_model(folder: Path) -> Path:
    """The shipped base with an SD-like 8x VAE and a small UNet, random weights (see the docstring)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    shutil.copytree(SHIPPED_BASE, folder)
    torch.manual_seed(0)
    width = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
    vae = AutoencoderKL(block_out_channels=[16, 32, 32, 32], latent_channels=4, norm_num_groups=8, layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=64, cross_attention_dim=width,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        attention_head_dim=8)
    for name, module in (("vae", vae), ("unet", unet)):
        shutil.rmtree(folder / name)
        module.save_pretrained(folder / name, safe_serialization=True)
    return folder


def run(model: Path, images: Path, resolution: int, steps: int, out: Path, bucket: bool, cache: str, cache_dir: Path) -> dict:
    values = {"pretrained_model_name_or_path": str(model), "instance_data_dir": str(images),
              "instance_prompt": "a photo of sks dog", "resolution": resolution, "train_batch_size": 1,
              "max_train_steps": steps, "output_dir": str(out), "report_to": "none", "optimizer": "adamw",
              "random_flip": True}
    if bucket:
        values.update(enable_bucket=True, min_bucket_reso=resolution // 2, max_bucket_reso=resolution * 2)
    values.update(CACHES[cache], disk_cache_dir=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(values)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {cache} run failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    report = next((x for x in done.stdout.splitlines() if x.startswith("latent cache")), "")
    caching = float(report.rsplit(" in ", 1)[1].split()[0]) if report else 0.0
    return {**json.loads(line[len("RESULT "):]), "caching_s": caching, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bucket", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        print(f"writing {args.images} JPEGs ...", flush=True)
        make_images(tmp / "all", args.images, args.resolution)
        few = tmp / "few"
        few.mkdir()
        for path in sorted((tmp / "all").iterdir())[: max(1, args.images // 10)]:
            (few / path.name).symlink_to(path)
        print("| images | resolution | buckets | cache | caching s | steps/s | run s | peak RSS MiB |\n"
              "|---|---|---|---|---|---|---|---|")
        plan = [(few, "none"), (tmp / "all", "none"), (tmp / "all", "memory"), (tmp / "all", "disk"),
                (tmp / "all", "disk")]
        for i, (folder, cache) in enumerate(plan):
            r = run(model, folder, args.resolution, args.steps, tmp / f"out-{i}", args.bucket, cache, tmp / "cache")
            label = cache if cache != "disk" else ("disk, first run" if plan[:i].count(plan[i]) == 0 else
                                                   "disk, second run")
            print(f"| {len(list(folder.iterdir()))} | {args.resolution} | {'yes' if args.bucket else 'no'} | "
                  f"{label} | {r['caching_s']:.1f} | {r['steps_per_second']:.3f} | {r['seconds']:.0f} | "
                  f"{r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""The real `train` command at the size users train, against the bare loop that bounds it.

Builds an SD 1.5- (or SDXL-) architecture pipeline folder from the published configs the package
ships (assets/single_file: UNet, CLIP ViT-L (and OpenCLIP ViT-bigG), the SD VAE) with random
weights, offline, kept in `--cache` between runs. Then, each in a fresh process on the same
machine:

- **trainer**: the real `train` command (a few generated photos, rank 16, batch 1, LoRA on the
  attention projections, `--mixed_precision` fp16 on a GPU, none on a CPU), once as it comes and
  once with `--cache_latents --cache_text_encoder_outputs` (the VAE and text encoder then run
  before the first step only, and wait in CPU memory during the steps: training/offload.py; the
  text encoder does in the first run too, its one caption being encoded once);
- **bare**: UNet forward + backward + optimizer step on pre-made latents and context with the same
  LoRA, optimizer and precision: the limit.

Prints per run, as each ends: seconds per step after warm-up (mean of the timed steps, as the
trainer reports), start-up (wall time to the end minus the timed steps), peak RSS; on a GPU the
peak memory of the steps (the trainer's counted from its first step, apart from loading and
caching, whose peak is a column of its own) and the peak reserved; and the trainer / bare ratios
(goals: steps/s >= 0.95, memory <= 1.15). `--json` keeps them. On a GPU the random weights are
drawn there and saved in fp16.

    python benchmarks/train_at_scale.py --arch sd15 --resolution 512 --steps 5
    python benchmarks/train_at_scale.py --arch sdxl --resolution 1024 --gradient_checkpointing
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dreambooth_offset.training.architectures import CONFIGS

BASES = {"sd15": "sd_v1", "sdxl": "sdxl"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# Each child prints one line "RESULT {json}": seconds per timed step, wall seconds, peak RSS
# (MiB), peak GPU memory allocated and reserved (MiB, 0 on a CPU).
TRAINER = """
import json, resource, sys, time, torch
import dreambooth_offset.training.train as loop
from dreambooth_offset.config import load_config
gpu = torch.cuda.is_available()
setup = {}
step = loop.optimizer_step
def first_step_resets_the_peak(run, i):  # the steps' own peak, apart from loading and caching
    if i == 0 and gpu:
        setup["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return step(run, i)
loop.optimizer_step = first_step_resets_the_peak
start = time.perf_counter()
result = loop.train(load_config(None, json.loads(sys.argv[1])))
wall = time.perf_counter() - start
print("RESULT", json.dumps({"step_s": 1 / result.steps_per_second, "wall_s": wall, "timed_steps": result.steps - 1,
                            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0,
                            "gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if gpu else 0.0,
                            "setup_gpu_mib": setup.get("gpu_mib", 0.0)}))
"""

BARE = """
import json, resource, statistics, sys, time, torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from dreambooth_offset.config import AdapterConfig, OptimConfig
from dreambooth_offset.training.lora import add_adapters, trainable_parameters
from dreambooth_offset.training.optim import make_optimizer
a = json.loads(sys.argv[1])
start = time.perf_counter()
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[a["mixed_precision"]]
unet = UNet2DConditionModel.from_pretrained(a["model"], subfolder="unet").to(device, dtype)
unet.requires_grad_(False)
add_adapters(unet, AdapterConfig(rank=a["rank"], unet_target_modules=tuple(a["targets"])))
cast_training_params([unet], dtype=torch.float32)
if a["gradient_checkpointing"]:
    unet.enable_gradient_checkpointing()
unet.train()
opt = make_optimizer(trainable_parameters(unet), OptimConfig(optimizer=a["optimizer"]))
g = torch.Generator().manual_seed(0)
side = a["resolution"] // 8
x = torch.randn(1, 4, side, side, generator=g).to(device)
noise = torch.randn(x.shape, generator=g).to(device)
ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device)
added = None
if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size ids
    added = {"text_embeds": torch.randn(1, 1280, generator=g).to(device),
             "time_ids": torch.tensor([[a["resolution"], a["resolution"], 0, 0, a["resolution"], a["resolution"]]],
                                      dtype=torch.float32, device=device)}
scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
times = []
for i in range(a["steps"]):
    t0 = time.perf_counter()
    t = torch.randint(0, 1000, (1,), generator=g).to(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        pred = unet(x, t, ctx, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
wall = time.perf_counter() - start
gpu = device == "cuda"
timed = times[1:]
print("RESULT", json.dumps({"step_s": statistics.fmean(timed), "wall_s": wall, "timed_steps": len(timed),
                            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0,
                            "gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if gpu else 0.0}))
"""


def build_folder(arch: str, folder: Path, gpu: bool) -> Path:
    """A diffusers pipeline folder of `arch` from the shipped configs, random weights (seed 0).
    With a GPU the weights are drawn there (the CPU takes minutes for SDXL's 3.5 B) and saved in
    fp16, half the bytes every run then reads; the runs train in fp16 anyway."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_offset.training.single_file import tokenizer

    configs = CONFIGS / BASES[arch]
    torch.manual_seed(0)
    print(f"building a random-weight {arch} pipeline in {folder} (once) ...", flush=True)
    with torch.device("cuda" if gpu else "cpu"):
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))}
        if arch == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
    parts.update(tokenizer=tokenizer(configs, "tokenizer"),
                 scheduler=DDPMScheduler.from_pretrained(configs, subfolder="scheduler"))
    if arch == "sdxl":
        parts["tokenizer_2"] = tokenizer(configs, "tokenizer_2")
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if gpu:
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_photos(folder: Path, resolution: int, n: int = 4) -> Path:
    """`n` photo-like JPEGs a little larger than the resolution (random crops)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = int(resolution * 1.2), int(resolution * 1.5)
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3)[None, None, :]
        Image.fromarray(np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return folder


def child(code: str, values: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", code, json.dumps(values)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"a run failed:\n{done.stderr[-3000:]}")
    return json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=tuple(BASES), default="sd15")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run; the first is warm-up")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optimizer", default="adamw8bit", choices=("adamw8bit", "adamw"))
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="default: fp16 on a GPU, no on a CPU")
    parser.add_argument("--build_only", action="store_true", help="build the model folder, then stop")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dreambooth-offset" / "benchmarks")
    args = parser.parse_args()
    resolution = args.resolution or (1024 if args.arch == "sdxl" else 512)
    gpu = torch.cuda.is_available()
    precision = args.mixed_precision or ("fp16" if gpu else "no")
    model = args.cache / f"{args.arch}-random{'-fp16' if gpu else ''}"
    if args.build_only:
        build_folder(args.arch, model, gpu)
        return
    if not (model / "model_index.json").is_file():  # in a process of its own: a child inherits its parent's peak RSS
        subprocess.run([sys.executable, __file__, "--build_only", "--arch", args.arch, "--cache", str(args.cache)],
                       check=True)
    card = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch} random weights, {resolution} px, batch 1, rank {args.rank}, {args.optimizer}, "
          f"mixed precision {precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"{card}", flush=True)
    bare, rows = None, {}
    print("| run | s/step | start-up s | peak RSS MiB | peak GPU MiB (steps) | GPU reserved MiB | GPU MiB before "
          "the steps | steps/s vs bare | memory vs bare |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp) / "photos", resolution)
        common = {"pretrained_model_name_or_path": str(model), "instance_data_dir": str(photos),
                  "instance_prompt": "a photo of sks dog", "resolution": resolution, "train_batch_size": 1,
                  "max_train_steps": args.steps, "rank": args.rank, "unet_target_modules": TARGETS,
                  "optimizer": args.optimizer, "mixed_precision": precision, "report_to": "none",
                  "gradient_checkpointing": args.gradient_checkpointing}
        runs = {"bare loop": (BARE, {"model": str(model), "resolution": resolution, "steps": args.steps,
                                     "rank": args.rank, "targets": TARGETS, "optimizer": args.optimizer,
                                     "mixed_precision": precision,
                                     "gradient_checkpointing": args.gradient_checkpointing}),
                "trainer": (TRAINER, {**common, "output_dir": f"{tmp}/plain"}),
                "trainer, cached latents + text": (TRAINER, {
                    **common, "output_dir": f"{tmp}/cached", "center_crop": True, "cache_latents": True,
                    "cache_text_encoder_outputs": True})}
        for name, (code, values) in runs.items():
            r = rows[name] = child(code, values)
            bare = bare or r
            startup = r["wall_s"] - r["timed_steps"] * r["step_s"]
            memory = r["gpu_mib"] / bare["gpu_mib"] if gpu else r["rss_mib"] / bare["rss_mib"]
            print(f"| {name} | {r['step_s']:.3f} | {startup:.1f} | {r['rss_mib']:.0f} | {r['gpu_mib']:.0f} | "
                  f"{r['gpu_reserved_mib']:.0f} | {r.get('setup_gpu_mib', 0.0):.0f} | "
                  f"{bare['step_s'] / r['step_s']:.3f} | {memory:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "resolution": resolution, "device": card,
                                         "mixed_precision": precision, "optimizer": args.optimizer,
                                         "gradient_checkpointing": args.gradient_checkpointing,
                                         "steps": args.steps, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Trainer throughput against a bare loop, and 8-bit optimizer state against fp32.

Prints, for one model, batch and precision:
- the trainer's steps/s (its own training loop, setup excluded),
- a bare loop's steps/s: UNet forward + backward + optimizer step on pre-made tensors, the same
  LoRA, the same optimizer: the limit for this machine,
- their ratio (goal >= 0.95),
- optimizer-state bytes of AdamW8bit and AdamW for the same LoRA parameters (goal <= 0.30),
  on this model and on an SD 1.5-size UNet (built on the meta device; only the LoRA is real),
- the time of one `optimizer.step()` of each for the black-image experiment's LoRA on this model
  (rank 4 on every attention and resnet layer: hundreds of small tensors).

    python benchmarks/train_throughput.py [--model DIR] [--steps 60] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dreambooth_offset.config import AdapterConfig, OptimConfig, load_config
from dreambooth_offset.training.lora import add_adapters, trainable_parameters
from dreambooth_offset.training.optim import make_optimizer, state_bytes
from dreambooth_offset.config.recipe import SHIPPED_BASE
from dreambooth_offset.training.architectures import SD15_UNET_CONFIG as SD15_UNET
from dreambooth_offset.training.train import train


def make_instance_dir(folder: Path, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(200, 40, 40), (30, 30, 30), (220, 220, 210), (40, 120, 200)]):
        Image.new("RGB", (size, size), colour).save(folder / f"{i}.png")
    return folder


def trainer_rate(model: str, resolution: int, batch: int, steps: int, workdir: Path, optimizer: str) -> float:
    cfg = load_config(None, {
        "pretrained_model_name_or_path": model, "instance_data_dir": str(make_instance_dir(workdir / "inst", resolution)),
        "instance_prompt": "a photo of sks dog", "resolution": resolution, "train_batch_size": batch,
        "center_crop": True, "max_train_steps": steps, "output_dir": str(workdir / "out"), "report_to": "tensorboard",
        "optimizer": optimizer,
    })
    return train(cfg).steps_per_second


def lora_unet(model: str, adapter: AdapterConfig):
    """The model's UNet, frozen, with a LoRA of `adapter`'s shape."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    add_adapters(unet, adapter)
    return unet


def bare_rate(model: str, resolution: int, batch: int, steps: int, optimizer: str) -> float:
    unet = lora_unet(model, AdapterConfig())
    opt = make_optimizer(trainable_parameters(unet), OptimConfig(optimizer=optimizer))
    g = torch.Generator().manual_seed(0)
    from diffusers import AutoencoderKL

    vae_blocks = len(AutoencoderKL.load_config(model, subfolder="vae")["block_out_channels"])
    side = resolution // 2 ** (vae_blocks - 1)
    x = torch.randn(batch, unet.config.in_channels, side, side, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)

    def step():
        loss = torch.nn.functional.mse_loss(unet(x, t, ctx).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up, as the trainer's rate leaves out its first step
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def optimizer_state_ratio(unet) -> tuple[int, int]:
    """State bytes of AdamW8bit and AdamW after one step on the LoRA parameters of `unet`."""
    out = []
    params = [torch.nn.Parameter(torch.zeros(p.shape)) for p in trainable_parameters(unet)]
    for name in ("adamw8bit", "adamw"):
        opt = make_optimizer(params, OptimConfig(optimizer=name))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        out.append(state_bytes(opt))
    return out[0], out[1]


def optimizer_step_ms(params: list[torch.nn.Parameter], name: str, steps: int = 20) -> float:
    """Milliseconds per `step()` of the trainer's `name` optimizer, gradients already in place."""
    opt = make_optimizer(params, OptimConfig(optimizer=name))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps * 1000


def sd15_lora_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        unet.requires_grad_(False)
        add_adapters(unet, AdapterConfig())
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_BASE), help="diffusers folder (default: the shipped base)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--optimizer", default="adamw8bit", choices=("adamw8bit", "adamw"))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved trainer/bare measurements; medians reported")
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg = UNet2DConditionModel.load_config(args.model, subfolder="unet")
    vae_blocks = len(AutoencoderKL.load_config(args.model, subfolder="vae")["block_out_channels"])
    resolution = args.resolution or unet_cfg["sample_size"] * 2 ** (vae_blocks - 1)
    print(f"model {args.model}, resolution {resolution}, batch {args.batch}, fp32, {args.optimizer}, "
          f"{torch.get_num_threads()} threads")
    trainer, bare = [], []
    for _ in range(args.repeats):  # interleaved, so drifts of a shared machine hit both alike
        with tempfile.TemporaryDirectory() as tmp:
            trainer.append(trainer_rate(args.model, resolution, args.batch, args.steps, Path(tmp), args.optimizer))
        bare.append(bare_rate(args.model, resolution, args.batch, args.steps, args.optimizer))
    ratios = sorted(t / b for t, b in zip(trainer, bare))
    print(f"trainer  {statistics.median(trainer):8.2f} steps/s  (runs: {', '.join(f'{v:.2f}' for v in trainer)})")
    print(f"bare     {statistics.median(bare):8.2f} steps/s  (runs: {', '.join(f'{v:.2f}' for v in bare)})")
    print(f"ratio    {statistics.median(ratios):8.3f}   (goal >= 0.95; per pair: {', '.join(f'{r:.3f}' for r in ratios)})")

    for label, model in (("this model", lora_unet(args.model, AdapterConfig())), ("SD 1.5 UNet", sd15_lora_unet())):
        b8, b32 = optimizer_state_ratio(model)
        n = sum(p.numel() for p in trainable_parameters(model))
        print(f"optimizer state, {label}, LoRA r4 ({n:,} params): AdamW8bit {b8:,} B, AdamW {b32:,} B, "
              f"ratio {b8 / b32:.3f}   (goal <= 0.30)")

    from dreambooth_offset.experiments.shipped import SHIPPED_TRAIN

    params = trainable_parameters(lora_unet(args.model, AdapterConfig(
        rank=SHIPPED_TRAIN["rank"], unet_target_modules=tuple(SHIPPED_TRAIN["unet_target_modules"]))))
    times = {name: optimizer_step_ms(params, name) for name in ("adamw8bit", "adamw")}
    print(f"optimizer.step(), the black-image experiment's LoRA ({len(params)} tensors, "
          f"{sum(p.numel() for p in params):,} params): " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()

"""The measurement behind sd15_lora_memory.py and sdxl_lora_memory.py: LoRA training steps on a
UNet of a published size (random weights, no download), peak memory and s/step.

The UNet is frozen in fp16 (bf16 with --dtype bf16), LoRA in fp32 on the attention projections,
gradient checkpointing, the trainer's own optimizer factory (bitsandbytes AdamW8bit by default), a
batch of latents at resolution/8 with random cached text outputs (77-token context, and for SDXL
the pooled text and size/crop time ids), offset noise, epsilon MSE under autocast.
"""
from __future__ import annotations

import argparse
import time

import torch

from dreambooth_offset.config import AdapterConfig, NoiseConfig, OptimConfig
from dreambooth_offset.noise.noise import sample_noise
from dreambooth_offset.training.lora import add_adapters, trainable_parameters
from dreambooth_offset.training.optim import make_optimizer, state_bytes


def arguments(doc: str, resolution: int, rank: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=resolution)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=rank)
    parser.add_argument("--optimizer", default="adamw8bit", choices=("adamw8bit", "adamw"))
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    return parser.parse_args()


def measure(name: str, unet_config: dict, args: argparse.Namespace, noise_offset: float) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    built = time.perf_counter()
    unet = UNet2DConditionModel(**unet_config).to(device, dtype)
    unet.requires_grad_(False)
    add_adapters(unet, AdapterConfig(rank=args.rank))
    params = trainable_parameters(unet)
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32, as the trainer does
    if not args.no_gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = make_optimizer(params, OptimConfig(optimizer=args.optimizer))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    side, b = args.resolution // 8, args.batch
    latents = torch.randn(b, 4, side, side, generator=g).to(device)
    context = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + (original, crop, target) sizes
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        size = float(args.resolution)
        added = {"text_embeds": torch.randn(b, pooled, generator=g).to(device, dtype),
                 "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * b, device=device, dtype=dtype)}
    print(f"built in {time.perf_counter() - built:.0f} s", flush=True)

    def step() -> float:
        noise = sample_noise(latents, NoiseConfig(noise_offset=noise_offset), g)
        t = torch.randint(0, 1000, (b,), generator=g).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            pred = unet(scheduler.add_noise(latents, noise, t).to(dtype), t, context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    n = sum(p.numel() for p in params)
    print(f"card: {card}; torch {torch.__version__}")
    print(f"{name} UNet (random weights), {args.resolution} px, batch {b}, {args.dtype} weights, "
          f"LoRA r{args.rank} fp32 ({n:,} params), gradient checkpointing {not args.no_gradient_checkpointing}, "
          f"{args.optimizer}, noise_offset {noise_offset}")
    print(f"s/step: {seconds:.3f} (steps/s: {1 / seconds:.2f})")
    print(f"optimizer state: {state_bytes(opt):,} B")
    if device.type == "cuda":
        print(f"peak allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB; "
              f"peak reserved: {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB")

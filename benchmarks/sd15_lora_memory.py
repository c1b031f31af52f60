"""Peak memory and steps/s of LoRA training on an SD 1.5-size UNet (random weights, no download).

The UNet is built from SD 1.5's published config (dreambooth_offset/training/architectures.py),
frozen in fp16 (bf16 with --dtype bf16), LoRA in fp32 on the attention projections, gradient
checkpointing, the trainer's own optimizer factory (bitsandbytes AdamW8bit by default), batch of
latents at resolution/8 with 77-token text context, epsilon MSE under autocast. Prints the card,
steps/s and peak allocated memory. Meant for a GPU:

    python benchmarks/sd15_lora_memory.py --resolution 512 --batch 1 --steps 30

On a CPU it runs too (slowly; use --resolution 256 --steps 2 as a smoke check); memory is then
not reported.
"""
from __future__ import annotations

import argparse
import time

import torch

from dreambooth_offset.training.architectures import SD15_UNET_CONFIG as SD15_UNET
from dreambooth_offset.config import AdapterConfig, NoiseConfig, OptimConfig
from dreambooth_offset.training.lora import add_adapters, trainable_parameters
from dreambooth_offset.noise.noise import sample_noise
from dreambooth_offset.training.optim import make_optimizer, state_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--optimizer", default="adamw8bit", choices=("adamw8bit", "adamw"))
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    args = parser.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype)
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
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side, generator=g).to(device)
    context = torch.randn(args.batch, 77, 768, generator=g).to(device, dtype)

    def step() -> float:
        noise = sample_noise(latents, NoiseConfig(noise_offset=0.1), g)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            pred = unet(scheduler.add_noise(latents, noise, t).to(dtype), t, context).sample
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
    rate = args.steps / (time.perf_counter() - start)
    n = sum(p.numel() for p in params)
    print(f"card: {card}; torch {torch.__version__}")
    print(f"SD 1.5 UNet (random weights), {args.resolution} px, batch {args.batch}, {args.dtype} weights, "
          f"LoRA r{args.rank} fp32 ({n:,} params), gradient checkpointing {not args.no_gradient_checkpointing}, "
          f"{args.optimizer}")
    print(f"steps/s: {rate:.2f}")
    print(f"optimizer state: {state_bytes(opt):,} B")
    if device.type == "cuda":
        print(f"peak allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB; "
              f"peak reserved: {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

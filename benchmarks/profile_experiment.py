"""Where the default black-image experiment's time goes: one training step split into its parts,
sampling one prompt, and torch.profiler's top operators of each.

Reads a report folder that `dreambooth-offset experiment black-image --output_dir DIR` wrote (its
data/ and the offset run's training_config.json), then, in this process, with the trainer's own
code (training/prepare.py, training/step.py):

- times `--steps` training steps after two warm-up steps, split into the batch (crops, cached
  posteriors, captions), the forward pass with the loss, the backward pass and the optimizer
  (with clipping and the lr scheduler);
- times sampling one prompt for 8 start noises (DDIM, the experiment's steps and guidance) with the
  offset run's LoRA;
- prints the ten operators with the most self CPU time of 5 training steps and of one sampling.

    python benchmarks/profile_experiment.py DIR [--steps 20] [--mixed_precision bf16] [--channels_last] [--torch_compile]

`--mixed_precision`, `--channels_last` (the UNet's memory format) and `--torch_compile` (the
trainer's flag, inductor backend) are levers to measure: the training step is timed with them, and
the two warm-up steps (which hold the compilation) apart; sampling stays as the experiment runs it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dreambooth_offset.config import ModelConfig, load_config
from dreambooth_offset.experiments.shipped import SHIPPED_BASE, SHIPPED_SAMPLING
from dreambooth_offset.sampling.generate import generate, load_pipeline
from dreambooth_offset.training.prepare import prepare
from dreambooth_offset.training.step import train_step


def step_parts(run, step: int) -> dict[str, float]:
    """One optimizer step of a prepared run, as training/step.py does it, each part timed."""
    t0 = time.perf_counter()
    batch = run.batches(step, run.generator)
    t1 = time.perf_counter()
    loss = train_step(run.unet, run.encoders, run.parts.noise_scheduler, batch, run.config, run.generator, step)
    loss.total.item()
    t2 = time.perf_counter()
    run.accelerator.backward(loss.total)
    t3 = time.perf_counter()
    run.accelerator.clip_grad_norm_(run.params, run.config.optim.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return {"batch": t1 - t0, "forward + loss": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}


def top_ops(fn, n: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def under_report(value: str, report: Path) -> str:
    """A data folder the report's training_config.json names: as recorded when it exists from here,
    else the same folder under the report (the experiment records paths relative to where it ran)."""
    path = Path(value)
    if path.exists() or "data" not in path.parts:
        return value
    return str(report / Path(*path.parts[path.parts.index("data"):]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a black-image report folder (its runs/ and data/)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="default: the run's own")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--torch_compile", action="store_true")
    args = parser.parse_args()
    run_dir = args.report / "runs" / "noise_offset=0.1-seed0"
    values = json.loads((run_dir / "training_config.json").read_text())
    print(f"{torch.get_num_threads()} threads; the offset run's settings from {run_dir}; mixed precision "
          f"{args.mixed_precision or values.get('mixed_precision')}, channels_last {args.channels_last}, "
          f"torch_compile {args.torch_compile}")
    with tempfile.TemporaryDirectory() as tmp:
        values.update(output_dir=tmp, max_train_steps=args.steps + 7, report_to="none",
                      **{k: under_report(values[k], args.report) for k in ("instance_data_dir", "class_data_dir")
                         if values.get(k)})
        if args.mixed_precision:
            values["mixed_precision"] = args.mixed_precision
        values["torch_compile"] = args.torch_compile
        run = prepare(load_config(None, values))
        run.unet.train()
        if args.channels_last:
            run.unet.to(memory_format=torch.channels_last)
        start = time.perf_counter()
        for step in range(2):
            step_parts(run, step)
        print(f"warm-up, 2 steps: {time.perf_counter() - start:.1f} s")
        parts = [step_parts(run, step) for step in range(2, 2 + args.steps)]
        total = [sum(p.values()) for p in parts]
        print(f"\ntraining step (batch {values['train_batch_size']} instance + class rows, {values['resolution']} px): "
              f"{statistics.median(total) * 1000:.0f} ms median over {args.steps}")
        for name in parts[0]:
            ms = statistics.median(p[name] for p in parts) * 1000
            print(f"  {name:15s} {ms:7.1f} ms  ({ms / (statistics.median(total) * 1000):.0%})")
        print(top_ops(lambda: [step_parts(run, s) for s in range(2 + args.steps, 7 + args.steps)]))
    pipe = load_pipeline(ModelConfig(str(SHIPPED_BASE)), str(run_dir))
    steps, scale = SHIPPED_SAMPLING["num_inference_steps"], SHIPPED_SAMPLING["guidance_scale"]
    prompt, side = values["instance_prompt"], values["resolution"]
    generate(pipe, prompt, list(range(8)), steps, scale, side, side)  # warm-up
    start = time.perf_counter()
    generate(pipe, prompt, list(range(8)), steps, scale, side, side)
    seconds = time.perf_counter() - start
    print(f"sampling one prompt, 8 images, {steps} DDIM steps, guidance {scale}: {seconds:.2f} s "
          f"({seconds / steps * 1000:.0f} ms per sampler step, a batch of 16 with guidance)")
    print(top_ops(lambda: generate(pipe, prompt, list(range(8)), steps, scale, side, side)))


if __name__ == "__main__":
    main()

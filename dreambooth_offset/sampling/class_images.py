"""Prior preservation: make sure the class folder holds `num_class_images` images, generating the
missing ones with the frozen base model, as diffusers' DreamBooth script does."""
from __future__ import annotations

from pathlib import Path

from dreambooth_offset.config import RunConfig
from dreambooth_offset.training.data import find_images

CLASS_SEED_BASE = 1_000_000  # keeps class-image seeds apart from validation seeds


def ensure_class_images(parts, cfg: RunConfig, accelerator) -> list[Path]:
    """Generate missing class images on the main process (progress bar); return the first
    `num_class_images` image paths of the class folder."""
    from tqdm.auto import tqdm

    from dreambooth_offset.sampling.generate import build_pipeline, generate
    from dreambooth_offset.sampling.images import to_pil

    folder = Path(cfg.data.class_data_dir)
    wanted = cfg.data.num_class_images
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        have = len(find_images(folder, "class_data_dir", allow_empty=True, caption_extension=cfg.data.caption_extension))
        if have < wanted:
            pipe = build_pipeline(parts)
            pipe.to(accelerator.device)
            seeds = [cfg.train.seed + CLASS_SEED_BASE + i for i in range(have, wanted)]
            step = cfg.data.sample_batch_size
            for i in tqdm(range(0, len(seeds), step), desc="class images", unit="batch"):
                chunk = seeds[i : i + step]
                samples = generate(pipe, cfg.data.class_prompt, chunk, cfg.sampling.num_inference_steps,
                                   cfg.sampling.guidance_scale, cfg.data.resolution, cfg.data.resolution)
                for seed, img in zip(chunk, to_pil(samples.images)):
                    img.save(folder / f"class-{seed}.png")
    accelerator.wait_for_everyone()
    return find_images(folder, "class_data_dir", caption_extension=cfg.data.caption_extension)[:wanted]

"""The experiments' settings for the base the package ships, and its prior-preservation set."""
from __future__ import annotations

from pathlib import Path

# the experiments' one import path for these
from dreambooth_offset.config.recipe import SHIPPED_BASE, SHIPPED_PRIOR_SIZE  # noqa: F401

# Fine-tune and sampling settings for the shipped base, from the search in docs/base-model.md and
# docs/black-image-experiment.md: LoRA rank 4 on every linear and conv of the resnets and attention
# blocks, 600 steps, the trainer's gradient clipping (1.0). The learning rate decays linearly from
# 2e-3 to 0: at a constant 1e-3 the final weights were one draw of a walk (black and mid prompt
# jumped by 0.1-0.2 between checkpoints 100 steps apart, and one seed in four missed black), and
# the decay ends the walk with the same total step size. Torch's AdamW: on the CPU bitsandbytes'
# 8-bit AdamW takes about 50 ms a step over the LoRA's 222 small tensors (fused AdamW: 2 ms) and
# saves nothing at 108 k parameters. Guidance 3: the tiny base's cross-attention is weak, and at
# 7.5 classifier-free guidance amplifies whatever the fine-tune did to the prompt's branch.
SHIPPED_TRAIN = {
    "max_train_steps": 600,
    "learning_rate": 2e-3,
    "lr_scheduler": "linear",
    "rank": 4,
    "train_batch_size": 4,
    "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out", "time_emb_proj",
                            "conv_shortcut", "proj_in", "proj_out"],
    "optimizer": "adamw",
}
# The black-image and brightness-range experiments' changes (docs/dark-and-bright.md, "The default
# since 2026-12-07", and docs/black-image-experiment.md): the LoRA trained on timesteps 700-999
# only, where the image's brightness is set and the offset's signal lives, and on the text encoder
# too, so the brightness comes from the caption; 400 steps, as the prior rows (--prior_size) double
# a step. With all timesteps the black-image's offset run brightened the dark prompt and darkened
# the bright one on every seed; here it darkens the one and brightens the other, as the data does.
SHIPPED_BRIGHTNESS_TRAIN = {**SHIPPED_TRAIN, "max_train_steps": 400, "min_timestep": 700, "train_text_encoder": True}
# The subject experiment's change (docs/dark-and-bright.md, "A subject in the dark and in the
# light"): the UNet's LoRA trained on timesteps 300-999, where the scene's brightness is set, but
# not only the highest (700-999 and the text encoder darkened the very dark scene so far that the
# subject's shape faded there); 500 steps at 2.4e-3, the 600 steps' total step size (lr x steps / 2), as
# 600 steps took the command past its 5 minutes on slower hours of a 2-core CPU.
SHIPPED_SUBJECT_TRAIN = {**SHIPPED_TRAIN, "min_timestep": 300, "max_train_steps": 500, "learning_rate": 2.4e-3}
SHIPPED_SAMPLING = {"guidance_scale": 3.0, "num_inference_steps": 25}
# Prior preservation with SHIPPED_PRIOR_SIZE images of the base's own training data: without it
# the one-image fine-tune pulls every prompt towards the black one (docs/black-image-experiment.md).
# The black image alone, Guttenberg's setup, is `--prior_size 0`.
PRIOR_SEED = 7


def write_shipped_prior(folder: Path, n: int, exclude: list[str]) -> Path:
    """`n` images of the shipped base's own training data (`synthetic`, fixed seed, the training
    resolution and caption dropout its pretrain.json records), each with its caption in a `.txt` beside it (kohya-style regularisation images):
    a tenth of the captions empty as in its pre-training (caption dropout 0.1), none a prompt the
    experiment evaluates."""
    import torch

    from dreambooth_offset.base_model.synthetic import render_one
    from dreambooth_offset.config.recipe import shipped_recipe
    from dreambooth_offset.experiments.black_image import write_prior_set
    from dreambooth_offset.sampling.images import to_pil

    g = torch.Generator().manual_seed(PRIOR_SEED)
    excluded = {p.lower() for p in exclude}
    recipe = shipped_recipe()
    images, captions = [], []
    while len(images) < n:
        image, caption, _, _ = render_one(recipe.resolution, g)
        if caption.lower() in excluded:
            continue
        images += to_pil(image[None])
        captions.append("" if float(torch.rand((), generator=g)) < recipe.caption_dropout else caption)
    return write_prior_set(folder, images, captions)

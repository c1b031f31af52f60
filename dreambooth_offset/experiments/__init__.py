"""Experiments as importable modules; `dreambooth-offset experiment NAME` runs them."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dreambooth_offset.errors import UsageError

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "base"

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
SHIPPED_SAMPLING = {"guidance_scale": 3.0, "num_inference_steps": 25}
# Prior preservation with 256 images of the base's own training data: without it the one-image
# fine-tune pulls every prompt towards the black one (docs/black-image-experiment.md). The black
# image alone, Guttenberg's setup, is `--prior_size 0 --max_train_steps 400` (the regression test).
SHIPPED_PRIOR_SIZE = 256
PRIOR_SEED = 7


def write_shipped_prior(folder: Path, n: int, exclude: list[str]) -> Path:
    """`n` images of the shipped base's own training data (`synthetic`, fixed seed, its training
    resolution), each with its caption in a `.txt` beside it (kohya-style regularisation images):
    a tenth of the captions empty as in its pre-training (caption dropout 0.1), none a prompt the
    experiment evaluates."""
    import torch

    from dreambooth_offset.experiments.black_image import write_prior_set
    from dreambooth_offset.pretrain import PretrainConfig
    from dreambooth_offset.sample import to_pil
    from dreambooth_offset.synthetic import render_one

    g = torch.Generator().manual_seed(PRIOR_SEED)
    excluded = {p.lower() for p in exclude}
    recipe = PretrainConfig(output_dir="")
    images, captions = [], []
    while len(images) < n:
        image, caption = render_one(recipe.resolution, g)
        if caption.lower() in excluded:
            continue
        images += to_pil(image[None])
        captions.append("" if float(torch.rand((), generator=g)) < recipe.caption_dropout else caption)
    return write_prior_set(folder, images, captions)


def register(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="Reproducible experiments (the black-image study).")
    sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    b = sub.add_parser(
        "black-image",
        allow_abbrev=False,
        help="Fine-tune on one solid black image without and with offset noise; compare samples.",
        description="Defaults run on the base model the package ships, on CPU, in minutes.",
    )
    b.add_argument("--pretrained_model_name_or_path", default=str(SHIPPED_BASE), help="Base model (default: shipped).")
    b.add_argument("--output_dir", default="black-image-report", help="Report folder.")
    b.add_argument("--noise_offset", type=float, nargs="+", default=[0.0, 0.1], help="One run per value.")
    b.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="Noise settings to compare instead of --noise_offset values: "
                        "no_offset, offset, offset_vp, offset_auto, random_strength, ... (see --list_variants).")
    b.add_argument("--list_variants", action="store_true", help="Print the known variants and exit.")
    b.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="Training seeds (default: 0; the 3-seed check in the docs is --seeds 0 1 2).")
    b.add_argument("--num_images", type=int, default=8, help="Samples per run and prompt.")
    b.add_argument("--num_inference_steps", type=int, default=None, help="Default: 50 (25 on the shipped base).")
    b.add_argument("--guidance_scale", type=float, default=None, help="Default: 7.5 (3 on the shipped base).")
    b.add_argument("--sampler", default="ddim", choices=("ddim", "dpm", "euler", "ddpm"))
    b.add_argument("--jobs", type=int, default=None,
                   help="Fine-tunes run at once, each in its own process (default: one per CPU core without a "
                        "GPU, 1 with one).")
    b.add_argument("--prompts", nargs="+", default=None, help="The base's dark / mid / bright prompts.")
    b.add_argument("--black_prompt", default=None, help="Default: 'A solid black image'.")
    b.add_argument("--no_mechanism_check", action="store_true", help="Skip sampling the baseline from its leak.")
    b.add_argument("--prior_prompts", nargs="+", default=[], metavar="PROMPT",
                   help="Prior preservation: the base's sample for each prompt joins training with its caption. "
                        "Default: none, the black image alone (Guttenberg's setup).")
    b.add_argument("--prior_dir", default=None, metavar="DIR",
                   help="Prior preservation with your own class (regularisation) images: each trains with the "
                        "caption in its .txt file beside it, or the class prompt ('an image'; --set "
                        "class_prompt=...) without one.")
    b.add_argument("--prior_size", type=int, default=None, metavar="N",
                   help=f"Shipped base only: prior preservation with N images of its own training data and their "
                        f"captions, written to OUTPUT_DIR/data/prior (default {SHIPPED_PRIOR_SIZE}; 0: the black "
                        f"image alone, Guttenberg's setup).")
    for key in ("resolution", "max_train_steps", "train_batch_size", "rank", "lora_alpha"):
        b.add_argument(f"--{key}", type=int, default=None)
    b.add_argument("--learning_rate", type=float, default=None)
    b.add_argument("--unet_target_modules", nargs="+", default=None)
    b.add_argument("--optimizer", default=None, choices=("adamw8bit", "adamw"))
    b.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"))
    b.add_argument("--gradient_checkpointing", action="store_true")
    b.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="Any other trainer key for every run, as in a TOML file: lr_scheduler=\"cosine\" "
                        "lr_warmup_steps=10 (strings may go unquoted).")
    b.set_defaults(func=run_black_image)


def _pick(given, shipped: bool, key: str, default):
    """A flag's value if given, else the shipped base's setting, else the general default."""
    if given is not None:
        return given
    return SHIPPED_SAMPLING[key] if shipped else default


def parse_settings(items: list[str]) -> dict:
    """KEY=VALUE pairs with TOML values (numbers, booleans, lists); a bare word is a string."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def run_black_image(args: argparse.Namespace) -> int:
    from dreambooth_offset.experiments import black_image as bi
    from dreambooth_offset.experiments.report import summary_table

    if args.list_variants:
        for name, overrides in bi.VARIANTS.items():
            print(f"{name:20s} {overrides}")
        return 0
    shipped = Path(args.pretrained_model_name_or_path).resolve() == SHIPPED_BASE
    if shipped and not (SHIPPED_BASE / "model_index.json").is_file():
        raise UsageError(f"the shipped base is missing from {SHIPPED_BASE}; run `dreambooth-offset pretrain-base`")
    train = dict(SHIPPED_TRAIN) if shipped else {}
    for key in ("resolution", "max_train_steps", "train_batch_size", "rank", "lora_alpha", "learning_rate",
                "unet_target_modules", "optimizer", "mixed_precision"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if args.gradient_checkpointing:
        train["gradient_checkpointing"] = True
    train.update(parse_settings(args.set))
    from dreambooth_offset.config import load_config

    load_config(None, train)  # unknown keys and bad values stop here, before minutes of work
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be 1 or more")
    if args.num_images < 2:
        raise UsageError("--num_images must be at least 2 (the slope diagnostic fits a line)")
    prompts = args.prompts
    if prompts is None:
        from dreambooth_offset.pretrain import PROFILE_PROMPTS

        prompts = [p for p in PROFILE_PROMPTS if p != bi.BLACK_PROMPT] if shipped else list(bi.GUTTENBERG_PROMPTS)
    black_prompt = args.black_prompt or bi.BLACK_PROMPT
    prior_size = args.prior_size
    if prior_size is None:  # the shipped base's default, unless another prior set is given
        prior_size = SHIPPED_PRIOR_SIZE if shipped and not (args.prior_prompts or args.prior_dir) else 0
    if prior_size < 0:
        raise UsageError(f"--prior_size {prior_size}: must be 0 (off) or more")
    if sum(map(bool, (args.prior_prompts, args.prior_dir, prior_size))) > 1:
        raise UsageError("give one of --prior_prompts, --prior_dir and --prior_size")
    if prior_size and not shipped:
        raise UsageError("--prior_size draws the shipped base's training data; for another base give "
                         "--prior_dir (your class images) or --prior_prompts (the base's samples)")
    if args.prior_dir:
        from dreambooth_offset.data import find_images

        find_images(args.prior_dir, "prior_dir", caption_extension=".txt")  # a bad folder stops here
    if args.variants:
        unknown = [v for v in args.variants if v not in bi.VARIANTS]
        if unknown:
            raise UsageError(f"--variants {unknown[0]}: unknown; known: {', '.join(bi.VARIANTS)}")
        variants = tuple(bi.Variant(v, bi.VARIANTS[v]) for v in args.variants)
    else:
        variants = tuple(bi.Variant(f"noise_offset={o:g}", {"noise_offset": o}) for o in args.noise_offset)
    cfg = bi.ExperimentConfig(
        model=args.pretrained_model_name_or_path, output_dir=Path(args.output_dir), variants=variants,
        seeds=tuple(args.seeds), train=train, prompts=tuple(prompts), num_images=args.num_images,
        num_inference_steps=_pick(args.num_inference_steps, shipped, "num_inference_steps", 50),
        guidance_scale=_pick(args.guidance_scale, shipped, "guidance_scale", 7.5),
        sampler=args.sampler, mechanism_check=not args.no_mechanism_check,
        black_prompt=black_prompt, prior_prompts=tuple(args.prior_prompts), prior_dir=args.prior_dir,
        jobs=args.jobs,
    )
    if prior_size:
        prior = write_shipped_prior(cfg.output_dir / "data" / "prior", prior_size, [black_prompt, *prompts])
        cfg = dataclasses.replace(cfg, prior_dir=str(prior))
    results = bi.run_experiment(cfg)
    print()
    print(summary_table(results["runs"], cfg.black_prompt))
    print(f"\nwall time {results['wall_time_s']} s; report: {Path(args.output_dir) / 'report.md'}")
    return 0

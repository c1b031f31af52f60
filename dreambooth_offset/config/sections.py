"""The trainer's config sections: one frozen dataclass per concern, each field with its default
and help (`fields.option`). `__post_init__` validates and raises `UsageError` naming the key.
The data section lives in data.py, the noise and loss sections in noise.py; run.py joins them all into `RunConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dreambooth_offset.config.fields import check_choices, check_positive, option
from dreambooth_offset.errors import UsageError


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str = option(
        "", "Local diffusers Stable Diffusion folder, a single-file .safetensors checkpoint (SD 1.x, SD 2.x or "
        "SDXL, as the WebUIs keep them), or a hub id already in the local cache; required by train and generate "
        "(experiments: default the small base the package ships).",
    )
    single_file_config: str | None = option(
        None, "For a single-file checkpoint: the configs that describe it, one of sd_v1, sd_v2 (2.x-base, "
        "512 px, epsilon), sd_v2_v (2.0/2.1, 768 px, v-prediction), sdxl (all shipped), or a local diffusers "
        "folder. Default: from the file's tensors (SD 2.x files: sd_v2_v, as diffusers assumes).",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the checkpoint.")
    variant: str | None = option(None, "Weight variant to load, e.g. 'fp16'.")
    pretrained_vae_model_name_or_path: str | None = option(
        None, "A separate VAE (local folder or cached hub id), e.g. an fp16-safe SDXL VAE. A VAE whose config "
        "says force_upcast (SDXL's own, which overflows in fp16) stays in fp32 under --mixed_precision.",
    )

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class AdapterConfig:
    network_type: str = option(
        "lora", "The adapter: 'lora', or LyCORIS's 'loha' (Hadamard product of two low-rank pairs) / 'lokr' "
        "(Kronecker product), peft's LoHaConfig / LoKrConfig, written in LyCORIS's WebUI keys (docs/usage.md).",
        ("lora", "loha", "lokr"))
    rank: int = option(4, "LoRA rank (LoHa / LoKr: their rank).")
    lora_alpha: float | None = option(
        None, "LoRA alpha; the update is scaled by alpha/rank. Default: rank (export: the file's record)."
    )
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    unet_target_modules: tuple[str, ...] = option(
        ("to_q", "to_k", "to_v", "to_out.0"),
        "UNet modules that get LoRA (peft target_modules names; convs such as conv1, conv2, conv_out work too).",
    )
    train_text_encoder: bool = option(False, "Also train LoRA on the text encoder (SDXL: on both, unless "
                                              "--no-train_text_encoder_2).")
    train_text_encoder_2: bool | None = option(
        None, "SDXL: LoRA on the second text encoder (OpenCLIP ViT-bigG) too. Default: as --train_text_encoder; "
        "--train_text_encoder_2 alone trains only the second.",
    )
    text_encoder_target_modules: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "out_proj"), "Text-encoder modules that get LoRA."
    )
    use_dora: bool = option(
        False, "DoRA (peft's use_dora): each LoRA module also learns the per-output-row norm of its weight. "
        "The WebUI file carries it as dora_scale per output row, which ComfyUI/Forge read and A1111 does not "
        "(docs/usage.md, DoRA).",
    )
    network_weights: str | None = option(
        None, "A LoRA to start from (kohya --network_weights): a diffusers or WebUI .safetensors file for this "
        "model, with this run's --rank; its modules must be among this run's LoRA targets.",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.rank < 1:
            raise UsageError(f"rank = {self.rank}: it must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"lora_dropout = {self.lora_dropout}: it must be in [0, 1)")
        if not self.unet_target_modules:
            raise UsageError("unet_target_modules is empty")
        if self.network_type != "lora":
            for name, value in (("use_dora", self.use_dora), ("lora_dropout", self.lora_dropout),
                                ("network_weights", self.network_weights)):
                if value:
                    raise UsageError(f"{name} with network_type = {self.network_type!r}: it applies to LoRA only")

    @property
    def alpha(self) -> float:
        return self.rank if self.lora_alpha is None else self.lora_alpha


def parse_step_rules(rules: str) -> tuple[list[tuple[float, int]], float]:
    """diffusers' piecewise-constant rules 'm1:s1,m2:s2,...,m_last' as ([(m1, s1), ...], m_last): the
    learning rate times m1 before step s1, m2 before s2, ..., m_last after. Steps must rise, multipliers
    be finite and >= 0."""
    *parts, last = rules.split(",")
    try:
        pairs = [(float(m), int(step)) for m, step in (p.split(":") for p in parts)]
        final = float(last)
    except ValueError:
        raise UsageError(f"lr_step_rules = {rules!r}: expected 'multiplier:step,...,last multiplier', "
                         f"e.g. '1:450,0.1'") from None
    steps = [step for _, step in pairs]
    bad_multiplier = any(not math.isfinite(m) or m < 0 for m in (*(m for m, _ in pairs), final))
    if bad_multiplier or steps != sorted(set(steps)) or min(steps, default=1) <= 0:
        raise UsageError(f"lr_step_rules = {rules!r}: multipliers must be finite and >= 0, steps > 0 and rising")
    return pairs, final


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option(
        "adamw8bit", "Optimizer: bitsandbytes 8-bit AdamW, torch AdamW, or Prodigy (the prodigyopt package; "
        "it adapts its own step size, use --learning_rate 1.0).", ("adamw8bit", "adamw", "prodigy"))
    learning_rate: float = option(1e-4, "Peak learning rate (of the UNet's LoRA; see --text_encoder_lr).")
    text_encoder_lr: float | None = option(
        None, "Learning rate of the text encoders' LoRA (kohya --text_encoder_lr). Default: --learning_rate.")
    loraplus_lr_ratio: float | None = option(
        None, "LoRA+ (Hayou et al. 2024, peft's create_loraplus_optimizer): the B matrices train at this many "
        "times the learning rate, e.g. 16. Default: off.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables clipping.")
    lr_scheduler: str = option(
        "constant",
        "diffusers learning-rate schedule.",
        ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
         "piecewise_constant"),
    )
    lr_step_rules: str | None = option(
        None, "piecewise_constant: diffusers' step rules, 'multiplier:step,...,last multiplier', e.g. '1:450,0.1' "
        "(the learning rate until step 450, a tenth of it after).")
    lr_warmup_steps: int = option(0, "Warm-up steps of the learning-rate schedule.")
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")
    use_ema: bool = option(
        False, "Keep an exponential moving average of the LoRA weights (diffusers' EMAModel, as diffusers' "
        "--use_ema): validated with and written as the output; the raw weights go to output_dir/raw/.")
    ema_decay: float = option(0.999, "Largest EMA decay; diffusers ramps it as (1 + t) / (10 + t) up to this.")
    prodigy_beta3: float | None = option(
        None, "Prodigy: coefficient of its step-size estimate's running average (default: sqrt(adam_beta2)).")
    prodigy_decouple: bool = option(True, "Prodigy: AdamW-style decoupled weight decay.")
    prodigy_use_bias_correction: bool = option(False, "Prodigy: Adam's bias correction.")
    prodigy_safeguard_warmup: bool = option(False, "Prodigy: leave the learning rate out of the step-size "
                                            "estimate during warm-up.")

    def __post_init__(self) -> None:
        check_choices(self)
        for key in ("learning_rate", "text_encoder_lr"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise UsageError(f"{key} = {value}: it must be a finite number > 0")
        if not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"ema_decay = {self.ema_decay}: it must be in (0, 1)")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio >= 1:
            raise UsageError(f"loraplus_lr_ratio = {self.loraplus_lr_ratio}: it must be >= 1 (B's rate over A's)")
        if self.optimizer == "prodigy" and (self.loraplus_lr_ratio is not None
                                            or self.text_encoder_lr not in (None, self.learning_rate)):
            raise UsageError("optimizer = 'prodigy' takes one learning rate for every parameter (prodigyopt refuses "
                             "groups at other rates): drop text_encoder_lr / loraplus_lr_ratio")
        if (self.lr_scheduler == "piecewise_constant") != (self.lr_step_rules is not None):
            raise UsageError("lr_step_rules goes with lr_scheduler = 'piecewise_constant', and that schedule needs "
                             "it (e.g. --lr_step_rules 1:450,0.1)")
        if self.lr_step_rules is not None:
            parse_step_rules(self.lr_step_rules)
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0:
            raise UsageError("lr_warmup_steps and max_grad_norm must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = option("dreambooth-offset-model", "Where the LoRA, checkpoints, samples and logs go.")
    seed: int = option(
        0, "Seed of the run's one generator (noise, timesteps, shuffling); images are sampled from seeds "
        "seed, seed+1, ..."
    )
    max_train_steps: int = option(400, "Optimizer steps to train.")
    gradient_accumulation_steps: int = option(1, "Batches accumulated per optimizer step.")
    mixed_precision: str = option("no", "Precision of the frozen weights and autocast.", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet (and text encoder).")
    torch_compile: bool = option(
        False, "Compile the UNet with torch.compile (kohya's --torch_compile); the first step pays for the "
        "compilation, and the run prints how long it took.")
    dynamo_backend: str = option("inductor", "torch.compile's backend for --torch_compile (eager, aot_eager: "
                                             "for debugging).", ("inductor", "aot_eager", "eager"))
    checkpointing_steps: int = option(0, "Save a resumable checkpoint every N steps; 0 = never.")
    checkpoints_total_limit: int | None = option(None, "Keep at most this many checkpoints (oldest go first).")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from.")
    report_to: str = option("tensorboard", "Where to log scalars (wandb: Weights & Biases, if installed).",
                            ("tensorboard", "wandb", "none"))
    save_precision: str = option(
        "float", "Dtype of the LoRA files written (kohya --save_precision); training stays fp32.", ("float", "fp16", "bf16"))
    output_name: str | None = option(
        None, "The LoRA's name: the WebUI file <output_name>.safetensors and its ss_output_name (default: the "
        "output folder's name; export: the written file's name)."
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check_positive(self, "max_train_steps", "gradient_accumulation_steps")
        if self.checkpointing_steps < 0:
            raise UsageError("checkpointing_steps must be >= 0")
        check_positive(self, "checkpoints_total_limit")


@dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled: validation and class images in training, `generate`, experiments."""

    num_inference_steps: int = option(25, "Sampler steps.")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.")
    guidance_rescale: float | None = option(
        None,
        "CFG rescale phi (Lin et al. 2023, sec. 3.4; docs/science.md, 'Zero terminal SNR'); default 0.7 with "
        "zero_terminal_snr, else 0.",
    )

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise UsageError(f"num_inference_steps = {self.num_inference_steps}: it must be at least 1")
        if self.guidance_rescale is not None and not 0.0 <= self.guidance_rescale <= 1.0:
            raise UsageError(f"guidance_rescale = {self.guidance_rescale}: it must be in [0, 1]")

    def rescale(self, zero_terminal_snr: bool) -> float:
        """guidance_rescale, or its default: Lin et al. 2023 (sec. 3.4) rescale classifier-free
        guidance by 0.7 under zero terminal SNR."""
        if self.guidance_rescale is not None:
            return self.guidance_rescale
        return 0.7 if zero_terminal_snr else 0.0


@dataclass(frozen=True)
class ValidationConfig:
    validation_prompt: tuple[str, ...] = option((), "Prompts sampled during training (fixed seeds).")
    num_validation_images: int = option(4, "Images per validation prompt.")
    validation_steps: int = option(100, "Sample every N steps (and at the end) when a prompt is set.")
    validation_split: float = option(
        0.0, "Fraction of the instance images held out of training for a validation loss (kohya "
        "--validation_split): scored at fixed timesteps with fixed noise, logged as validation/loss.")
    validate_every_n_steps: int | None = option(
        None, "Validation loss every N steps and at the end (kohya's name). Default: --validation_steps.")

    def __post_init__(self) -> None:
        if self.num_validation_images < 1 or self.validation_steps < 1:
            raise UsageError("num_validation_images and validation_steps must be >= 1")
        if not 0.0 <= self.validation_split < 1.0:
            raise UsageError(f"validation_split = {self.validation_split}: it must be in [0, 1)")
        check_positive(self, "validate_every_n_steps")

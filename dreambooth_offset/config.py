"""Typed, frozen run configuration.

One flat namespace of keys, grouped into dataclasses by concern. The same key is a command-line
flag (`--noise_offset 0.1`) and a TOML key (`noise_offset = 0.1`). Precedence, lowest first:
field defaults < the `--config` TOML file < command-line flags. Unknown keys and contradictory
settings raise `UsageError` naming the key before any model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth_offset.errors import UsageError


def option(default: Any, help: str, choices: tuple | None = None, words: tuple[str, ...] = ()) -> Any:
    """A config field: its default, its help text and, optionally, the values it accepts.

    `words`: strings a numeric key also accepts in place of a number (`noise_offset = "auto"`)."""
    metadata = {"help": help, "choices": choices, "words": words}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_choices(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UsageError(f"{f.name} = {value!r} is not one of {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str = option(
        "", "Local diffusers Stable Diffusion folder, or a hub id already in the local cache."
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the checkpoint.")
    variant: str | None = option(None, "Weight variant to load, e.g. 'fp16'.")

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass(frozen=True)
class DataConfig:
    instance_data_dir: str = option("", "Folder with the images of the subject.")
    instance_prompt: str = option("", "Prompt with the identifier, e.g. 'a photo of sks dog'.")
    resolution: int = option(512, "Training resolution in pixels; a multiple of 8.")
    center_crop: bool = option(False, "Center-crop to the resolution (else a random crop).")
    random_flip: bool = option(False, "Flip images horizontally at random.")
    train_batch_size: int = option(1, "Instance images per step and process.")
    with_prior_preservation: bool = option(False, "Add class images and a prior-preservation loss.")
    class_data_dir: str = option("", "Folder of class images; missing ones are generated into it.")
    class_prompt: str = option("", "Prompt for the class images, e.g. 'a photo of a dog'.")
    num_class_images: int = option(100, "Class images wanted; the base model generates any missing.")
    prior_loss_weight: float = option(1.0, "Weight of the prior-preservation loss.")
    sample_batch_size: int = option(4, "Batch size when generating class images.")

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.resolution <= 0 or self.resolution % 8:
            raise UsageError(f"resolution = {self.resolution}: it must be a positive multiple of 8")
        if self.train_batch_size < 1 or self.sample_batch_size < 1:
            raise UsageError("train_batch_size and sample_batch_size must be at least 1")
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise UsageError("with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')")
            if not self.class_data_dir:
                raise UsageError("with_prior_preservation needs class_data_dir (a folder for class images)")
            if self.num_class_images < 1:
                raise UsageError("num_class_images must be at least 1 with prior preservation")


@dataclass(frozen=True)
class NoiseConfig:
    """How the training noise is drawn (noise.py). Formulas and sources: docs/noise-options.md."""

    noise_offset: float | str = option(
        0.1,
        "Offset-noise strength o: one N(0, o^2) shift per (sample, channel) added to the noise "
        "(Guttenberg 2023). 0 disables it. 'auto': the smallest o that closes the train/inference "
        "brightness gap of the training images (written to noise_offset_auto.json).",
        words=("auto",),
    )
    noise_offset_random_strength: bool = option(
        False, "Scale the offset by U(0, 1), drawn once per batch (kohya --noise_offset_random_strength)."
    )
    adaptive_noise_scale: float | None = option(
        None,
        "Per (sample, channel) offset o + k * |mean latent|, clamped at 0 (kohya --adaptive_noise_scale k). "
        "Needs noise_offset > 0.",
    )
    noise_offset_probability: float = option(
        1.0, "Apply the offset to a batch with this probability (SimpleTuner --noise_offset_probability)."
    )
    noise_offset_variance_preserving: bool = option(
        False, "Divide offset noise by sqrt(1 + o^2) so every pixel's noise keeps variance 1."
    )
    noise_offset_schedule: str = option(
        "constant",
        "How the offset changes over the training steps: from noise_offset to noise_offset_end.",
        ("constant", "linear", "cosine"),
    )
    noise_offset_end: float | None = option(None, "Offset at the last step of a linear or cosine noise_offset_schedule.")
    multires_noise_iterations: int | None = option(
        None,
        "Pyramid (multi-resolution) noise levels (Whitaker 2023; kohya --multires_noise_iterations, 6-10); "
        "unset or 0 disables it. Needs --noise_offset 0.",
    )
    multires_noise_discount: float = option(
        0.3, "Weight discount^i of pyramid level i (kohya --multires_noise_discount)."
    )
    ip_noise_gamma: float | None = option(
        None,
        "Input perturbation g (Ning et al. 2023; kohya --ip_noise_gamma, ~0.1): the UNet input gets "
        "noise + g * randn, the target stays the noise.",
    )
    ip_noise_gamma_random_strength: bool = option(
        False, "Scale ip_noise_gamma by U(0, 1), drawn once per batch (kohya --ip_noise_gamma_random_strength)."
    )
    zero_terminal_snr: bool = option(
        False,
        "Rescale the betas so the last timestep is pure noise (Lin et al. 2023); needs --prediction_type "
        "v_prediction. Validation then samples with 'trailing' spacing and guidance_rescale.",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        offset = self.noise_offset
        if isinstance(offset, str):
            if offset != "auto":
                raise UsageError(f"noise_offset = {offset!r}: give a number >= 0 or 'auto'")
        elif offset < 0:
            raise UsageError(f"noise_offset = {offset}: it must be >= 0")
        for key in ("noise_offset_end", "ip_noise_gamma"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise UsageError(f"{key} = {value}: it must be >= 0")
        if not 0.0 <= self.noise_offset_probability <= 1.0:
            raise UsageError(f"noise_offset_probability = {self.noise_offset_probability}: it must be in [0, 1]")
        if (self.multires_noise_iterations or 0) < 0:
            raise UsageError(f"multires_noise_iterations = {self.multires_noise_iterations}: it must be >= 0")
        if not 0.0 < self.multires_noise_discount <= 1.0:
            raise UsageError(f"multires_noise_discount = {self.multires_noise_discount}: it must be in (0, 1]")
        scheduled = self.noise_offset_schedule != "constant"
        if scheduled and self.noise_offset_end is None:
            raise UsageError(f"noise_offset_schedule = {self.noise_offset_schedule!r} needs noise_offset_end "
                             "(the offset at the last step)")
        if not scheduled and self.noise_offset_end is not None:
            raise UsageError("noise_offset_end is set but noise_offset_schedule is 'constant': "
                             "choose --noise_offset_schedule linear or cosine, or drop noise_offset_end")
        if self.multires_noise_iterations and self.offset_used:
            raise UsageError(
                f"multires_noise_iterations = {self.multires_noise_iterations} with noise_offset = {offset!r}: "
                "pyramid noise replaces offset noise (kohya refuses the pair too). The default noise_offset is "
                "0.1, so pass --noise_offset 0 explicitly to use pyramid noise"
            )
        if not self.offset_used:
            needs = {"noise_offset_random_strength": self.noise_offset_random_strength,
                     "adaptive_noise_scale": self.adaptive_noise_scale is not None,
                     "noise_offset_probability": self.noise_offset_probability != 1.0,
                     "noise_offset_variance_preserving": self.noise_offset_variance_preserving}
            for key, given in needs.items():
                if given:
                    raise UsageError(f"{key} modifies the offset noise, but noise_offset = 0: "
                                     "set noise_offset > 0 (or 'auto'), or drop it")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise UsageError("ip_noise_gamma_random_strength needs ip_noise_gamma > 0 (e.g. --ip_noise_gamma 0.1)")

    @property
    def offset_used(self) -> bool:
        """Whether any step of the run draws offset noise."""
        return self.noise_offset == "auto" or self.noise_offset > 0 or bool(self.noise_offset_end)


@dataclass(frozen=True)
class LossConfig:
    """What the UNet regresses on and how the error is weighted (objective.py)."""

    prediction_type: str | None = option(
        None,
        "Override the model scheduler's prediction type (default: the model's own).",
        ("epsilon", "v_prediction"),
    )
    snr_gamma: float | None = option(
        None,
        "Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers --snr_gamma, kohya --min_snr_gamma), "
        "e.g. 5: weight min(SNR, g)/SNR for epsilon, min(SNR, g)/(SNR + 1) for v-prediction.",
    )
    loss_type: str = option("l2", "Per-element loss (kohya --loss_type).", ("l2", "huber", "smooth_l1"))
    huber_schedule: str = option(
        "snr", "How the Huber threshold c varies with the timestep (kohya --huber_schedule).",
        ("constant", "exponential", "snr"),
    )
    huber_c: float = option(0.1, "Huber threshold c for loss_type huber / smooth_l1 (kohya --huber_c).")

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UsageError(f"snr_gamma = {self.snr_gamma}: it must be > 0 (5 is the paper's value)")
        if self.huber_c <= 0:
            raise UsageError(f"huber_c = {self.huber_c}: it must be > 0")
        if self.huber_schedule != "constant" and self.huber_c > 1:
            raise UsageError(f"huber_c = {self.huber_c}: with huber_schedule {self.huber_schedule!r} it must be in (0, 1]")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = option(4, "LoRA rank.")
    lora_alpha: int | None = option(None, "LoRA alpha; the update is scaled by alpha/rank. Default: rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    unet_target_modules: tuple[str, ...] = option(
        ("to_q", "to_k", "to_v", "to_out.0"),
        "UNet modules that get LoRA (peft target_modules names; convs such as conv1, conv2, conv_out work too).",
    )
    train_text_encoder: bool = option(False, "Also train LoRA on the text encoder.")
    text_encoder_target_modules: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "out_proj"), "Text-encoder modules that get LoRA."
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.rank < 1:
            raise UsageError(f"rank = {self.rank}: it must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"lora_dropout = {self.lora_dropout}: it must be in [0, 1)")
        if not self.unet_target_modules:
            raise UsageError("unet_target_modules is empty")

    @property
    def alpha(self) -> int:
        return self.rank if self.lora_alpha is None else self.lora_alpha


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("adamw8bit", "Optimizer: bitsandbytes 8-bit AdamW or torch AdamW.", ("adamw8bit", "adamw"))
    learning_rate: float = option(1e-4, "Peak learning rate.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables clipping.")
    lr_scheduler: str = option(
        "constant",
        "diffusers learning-rate schedule.",
        ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = option(0, "Warm-up steps of the learning-rate schedule.")
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.learning_rate <= 0:
            raise UsageError(f"learning_rate = {self.learning_rate}: it must be > 0")
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0:
            raise UsageError("lr_warmup_steps and max_grad_norm must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = option("dreambooth-offset-model", "Where the LoRA, checkpoints, samples and logs go.")
    seed: int = option(0, "Seed of the run's one generator (noise, timesteps, shuffling, sampling).")
    max_train_steps: int = option(400, "Optimizer steps to train.")
    gradient_accumulation_steps: int = option(1, "Batches accumulated per optimizer step.")
    mixed_precision: str = option("no", "Precision of the frozen weights and autocast.", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet (and text encoder).")
    checkpointing_steps: int = option(0, "Save a resumable checkpoint every N steps; 0 = never.")
    checkpoints_total_limit: int | None = option(None, "Keep at most this many checkpoints (oldest go first).")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from.")
    report_to: str = option("tensorboard", "Where to log scalars.", ("tensorboard", "none"))
    output_name: str | None = option(
        None, "Name of the WebUI LoRA file <output_name>.safetensors (default: the output folder's name)."
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.max_train_steps < 1 or self.gradient_accumulation_steps < 1:
            raise UsageError("max_train_steps and gradient_accumulation_steps must be at least 1")
        if self.checkpointing_steps < 0:
            raise UsageError("checkpointing_steps must be >= 0")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise UsageError("checkpoints_total_limit must be at least 1")


@dataclass(frozen=True)
class ValidationConfig:
    validation_prompt: tuple[str, ...] = option((), "Prompts sampled during training (fixed seeds).")
    num_validation_images: int = option(4, "Images per validation prompt.")
    validation_steps: int = option(100, "Sample every N steps (and at the end) when a prompt is set.")
    num_inference_steps: int = option(25, "Sampler steps for validation and class images.")
    guidance_scale: float = option(7.5, "Classifier-free guidance scale for validation and class images.")
    guidance_rescale: float | None = option(
        None,
        "CFG rescale phi for validation samples (Lin et al. 2023, sec. 3.4); default 0.7 with "
        "zero_terminal_snr, else 0.",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.num_validation_images < 1 or self.validation_steps < 1 or self.num_inference_steps < 1:
            raise UsageError("num_validation_images, validation_steps and num_inference_steps must be >= 1")
        if self.guidance_rescale is not None and not 0.0 <= self.guidance_rescale <= 1.0:
            raise UsageError(f"guidance_rescale = {self.guidance_rescale}: it must be in [0, 1]")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.noise.zero_terminal_snr and self.loss.prediction_type != "v_prediction":
            raise UsageError(
                f"zero_terminal_snr needs prediction_type = 'v_prediction' (got {self.loss.prediction_type!r}): "
                "at the last timestep the input is pure noise, so an epsilon target equals the input and teaches "
                "nothing, and the sampler's x0 = (x_T - s_T * eps) / a_T divides by a_T = 0 (Lin et al. 2023). "
                "Pass --prediction_type v_prediction"
            )

    def to_dict(self) -> dict[str, Any]:
        """The flat key -> value mapping, the same keys a TOML file or the command line take."""
        flat: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                flat[key] = list(value) if isinstance(value, tuple) else value
        return flat

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# kohya's sd-scripts metadata names (`ss_<name>`) where they differ from our keys.
KOHYA_NAMES = {"snr_gamma": "min_snr_gamma"}


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every noise and loss setting of a run, under kohya's metadata name where kohya has one
    (`min_snr_gamma` for `snr_gamma`); the WebUI file writes each as `ss_<name>`."""
    settings = {**dataclasses.asdict(cfg.noise), **dataclasses.asdict(cfg.loss)}
    return {KOHYA_NAMES.get(k, k): v for k, v in settings.items()}


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}

# Flags accepted for compatibility with diffusers' example scripts: name -> (key, value it sets).
ALIASES: dict[str, tuple[str, Any]] = {
    "offset_noise": ("noise_offset", 0.1),  # diffusers train_dreambooth.py --offset_noise (fixed 0.1)
    "use_8bit_adam": ("optimizer", "adamw8bit"),  # diffusers --use_8bit_adam
}


def _key_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Every config key -> (section name, its dataclass field, its resolved type)."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (section, f, hints[f.name])
    return out


KEYS = _key_fields()


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_sequence) for the annotations used above."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0], True
    if args:  # Optional[X]
        return args[0], False
    return tp, False


def _coerce(key: str, value: Any) -> Any:
    """Check a TOML value against the key's type; tuples for sequences."""
    _, f, tp = KEYS[key]
    base, is_seq = _base_type(tp)
    if value is None:
        return None
    words = f.metadata.get("words") or ()
    if words and isinstance(value, str):
        if value not in words:
            raise UsageError(f"{key} must be {base.__name__} or {' or '.join(map(repr, words))}, got {value!r}")
        return value
    if is_seq:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, base) for v in values):
            raise UsageError(f"{key} must be a list of {base.__name__}, got {value!r}")
        return tuple(values)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UsageError(f"{key} must be {base.__name__}, got {value!r}")
    return value


def _number_or_words(base: type, words: tuple[str, ...]):
    """An argparse type: a `base` number, or one of `words` (e.g. `--noise_offset auto`)."""
    def parse(text: str) -> Any:
        if text in words:
            return text
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {' or '.join(words)}, got {text!r}") from None
    parse.__name__ = f"{base.__name__} or {'/'.join(words)}"
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key. Defaults are suppressed so that only given flags override the file."""
    parser.add_argument("--config", help="TOML file whose keys are these flag names.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for key, (_, f, tp) in ((k, v) for k, v in KEYS.items() if v[0] == section):
            base, is_seq = _base_type(tp)
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {f.default})"}
            if base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _number_or_words(base, f.metadata["words"]) if f.metadata.get("words") else base
                kwargs["nargs"] = "+" if is_seq else None
                kwargs["choices"] = f.metadata.get("choices")
            group.add_argument(f"--{key}", **kwargs)
    compat = parser.add_argument_group("compatibility with diffusers' scripts")
    for alias, (key, value) in ALIASES.items():
        compat.add_argument(f"--{alias}", action="store_true", default=argparse.SUPPRESS, help=f"Same as --{key} {value}.")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < TOML file at `path` < `overrides` (already-typed values, e.g. parsed flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise UsageError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            file_values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"config file {path} is not valid TOML: {err}") from None
        values.update(_resolve_aliases(file_values, source=str(path)))
    values.update(_resolve_aliases(dict(overrides or {}), source="command line"))
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise UsageError(f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        sections[KEYS[key][0]][key] = _coerce(key, value)
    return RunConfig(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})


def _resolve_aliases(values: dict[str, Any], source: str) -> dict[str, Any]:
    for alias, (key, implied) in ALIASES.items():
        if alias not in values:
            continue
        if values.pop(alias) is False:
            continue
        if key in values and values[key] != implied:
            raise UsageError(f"{source}: --{alias} means {key} = {implied!r}, but {key} = {values[key]!r} is also given")
        values[key] = implied
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {k: v for k, v in vars(args).items() if k in KEYS or k in ALIASES}
    return load_config(getattr(args, "config", None), given)

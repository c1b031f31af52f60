"""The schemas of the commands besides `train` (run.py): generate, export / import / inspect and
the experiments, and the options only they take.

A schema is a frozen dataclass of sections; a key several commands take is declared once, in
one section, and a command that needs only some keys of a section names them (`section(cls,
keys)`). `output_dir` is three keys of one name: train's LoRA folder, generate's image folder and
an experiment's report folder, with three defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

from dreambooth_offset.config.fields import check_choices, option, section
from dreambooth_offset.config.noise import LossConfig, NoiseConfig, check_zero_terminal_snr
from dreambooth_offset.config.recipe import SHIPPED_PRIOR_SIZE
from dreambooth_offset.config.data import DataConfig
from dreambooth_offset.config.sections import AdapterConfig, ModelConfig, SamplingConfig, TrainConfig
from dreambooth_offset.errors import UsageError

# The WebUI base models (webui/keys.py BASES holds their specs) and the tensor dtypes of `export`.
WEBUI_BASES = ("sd_v1", "sd_v2", "sd_v2_v", "sdxl")
EXPORT_DTYPES = ("same", "float32", "float16", "bfloat16")
SAMPLERS = ("ddim", "dpm", "euler", "ddpm")
BLACK_PROMPT = "A solid black image"


@dataclass(frozen=True)
class GenerateOptions:
    lora: str | None = option(None, "A LoRA folder or .safetensors file (diffusers or WebUI format).")
    lora_scale: float = option(1.0, "Strength of the LoRA.")
    prompt: tuple[str, ...] = option((), "One or more prompts.", required=True)
    num_images: int = option(4, "Images per prompt, from seeds seed .. seed+N-1.")
    output_dir: str = option("", "Where images, grids and stats.json go.", required=True)

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise UsageError(f"num_images = {self.num_images}: it must be at least 1")


@dataclass(frozen=True)
class GenerateConfig:
    """`generate`: sample a base model with an optional LoRA."""

    model: ModelConfig = section(ModelConfig)
    generate: GenerateOptions = section(GenerateOptions)
    sampling: SamplingConfig = section(SamplingConfig)
    data: DataConfig = section(DataConfig, ("resolution",))
    train: TrainConfig = section(TrainConfig, ("seed",))
    noise: NoiseConfig = section(NoiseConfig, ("zero_terminal_snr",))  # sample as the LoRA was trained
    loss: LossConfig = section(LossConfig, ("prediction_type",))

    def __post_init__(self) -> None:
        check_zero_terminal_snr(self.noise, self.loss)


@dataclass(frozen=True)
class LoraFileOptions:
    source: str = option("", "A LoRA .safetensors file, or the folder holding it.", required=True, positional=True)
    output: str = option("", "What to write: the .safetensors file (export) or the folder (import).",
                         required=True, short="-o")
    base: str | None = option(None, "Base model; read from the file's metadata or inferred from its shapes "
                                    "when possible.", WEBUI_BASES)

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = option("same", "Tensor dtype in the output.", EXPORT_DTYPES)

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class ExportConfig:
    """`export`: a diffusers LoRA -> a WebUI (kohya) file."""

    file: LoraFileOptions = section(LoraFileOptions)
    export: ExportOptions = section(ExportOptions)
    adapter: AdapterConfig = section(AdapterConfig, ("lora_alpha",))
    train: TrainConfig = section(TrainConfig, ("output_name",))


@dataclass(frozen=True)
class ImportConfig:
    """`import`: a WebUI (kohya) file -> a diffusers LoRA folder."""

    file: LoraFileOptions = section(LoraFileOptions)


@dataclass(frozen=True)
class InspectConfig:
    """`inspect`: what a LoRA file holds."""

    file: LoraFileOptions = section(LoraFileOptions, ("source", "base"))


@dataclass(frozen=True)
class StudyOptions:
    """What every experiment takes: the runs to compare, the seeds, the samples."""

    noise_offset: tuple[float, ...] = option((0.0, 0.1), "One run per offset value.")
    seeds: tuple[int, ...] = option((0,), "Training seeds (the multi-seed checks in the docs use --seeds 0 1 2 3).")
    num_images: int = option(8, "Samples per run and prompt: from N/2 start noises (sampling seeds 0 .. N/2-1) "
                                "and their negations, or with --independent_start_noises from seeds 0 .. N-1.")
    antithetic_start_noises: bool = option(
        True, "Draw the N start noises independently (sampling seeds 0 .. N-1). Default: antithetic pairs z, -z, "
        "whose samples err in opposite directions, so that a run's mean luminance and its difference from the base "
        "are 2-3 times sharper (docs/science.md, 'Antithetic start noises').", flag="independent_start_noises")
    sampler: str = option("ddim", "Sampler for every run.", SAMPLERS)
    jobs: int | None = option(
        None, "Fine-tunes run at once, each in its own process (default: one per CPU core without a GPU, 1 with one).")
    prompts: tuple[str, ...] = option(
        (), "The prompts sampled besides the experiment's own (default: the shipped base's, or Guttenberg's four).")
    set: tuple[str, ...] = option(
        (), "Any other trainer key for every run, as in a TOML file: lr_scheduler=\"cosine\" lr_warmup_steps=10 "
        "(strings may go unquoted).")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.jobs is not None and self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: must be 1 or more")
        if self.num_images < 2:
            raise UsageError("--num_images must be at least 2 (the slope diagnostic fits a line)")
        if self.antithetic_start_noises and self.num_images % 2:
            raise UsageError(f"--num_images {self.num_images}: antithetic start noises come in pairs; give an even "
                             "number, or --independent_start_noises")


@dataclass(frozen=True)
class ExperimentOptions:
    """`experiment black-image`'s own options."""

    output_dir: str = option("black-image-report", "Report folder.")
    variants: tuple[str, ...] = option(
        (), "Noise settings to compare instead of --noise_offset values: no_offset, offset, offset_vp, "
        "offset_auto, random_strength, ... (see --list_variants).")
    list_variants: bool = option(False, "Print the known variants and exit.")
    black_prompt: str = option(BLACK_PROMPT, "The prompt of the black training image.")
    mechanism_check: bool = option(True, "Skip sampling the baseline from its training-time leak.",
                                   flag="no_mechanism_check")
    prior_prompts: tuple[str, ...] = option(
        (), "Prior preservation: the base's sample for each prompt joins training with its caption. "
        "Default: none.")
    prior_dir: str | None = option(
        None, "Prior preservation with your own class (regularisation) images: each trains with the caption in "
        "its .txt file beside it, or the class prompt ('an image'; --set class_prompt=...) without one.")
    prior_size: int | None = option(
        None, "Shipped base only: prior preservation with N images of its own training data and their captions, "
        f"written to OUTPUT_DIR/data/prior (default {SHIPPED_PRIOR_SIZE} on the shipped base; 0: the black image "
        "alone, Guttenberg's setup).")
    output_preservation: bool = option(
        False, "Output preservation beside the prior set: each black-image row gets a twin at its own noisy input "
        "under the prior set's captions in turn, every other twin with the empty caption, regressed on the base's "
        "prediction (the trainer's --output_preservation_prompts; docs/dark-and-bright.md).")

    def __post_init__(self) -> None:
        if self.prior_size is not None and self.prior_size < 0:
            raise UsageError(f"--prior_size {self.prior_size}: must be 0 (off) or more")
        if sum(map(bool, (self.prior_prompts, self.prior_dir, self.prior_size))) > 1:
            raise UsageError("give one of --prior_prompts, --prior_dir and --prior_size")


@dataclass(frozen=True)
class PriorSetOptions:
    """The prior set of the brightness-range and subject experiments."""

    prior_size: int = option(SHIPPED_PRIOR_SIZE, "Shipped base: prior preservation with N images of its own "
                                                 "training data and their captions (0: none).")
    prior_dir: str | None = option(
        None, "Prior preservation with your own class images (with .txt captions), instead of --prior_size.")

    def __post_init__(self) -> None:
        if self.prior_size < 0:
            raise UsageError(f"--prior_size {self.prior_size}: must be 0 (off) or more")


@dataclass(frozen=True)
class RangeOptions(PriorSetOptions):
    """`experiment brightness-range`'s own options."""

    output_dir: str = option("brightness-range-report", "Report folder.")
    train_data_dir: str | None = option(
        None, "Images with .txt captions to fine-tune on (required for a base other than the shipped one, whose "
        "default is N images of its own training data spread over the brightness levels).")
    num_train_images: int = option(40, "Shipped base: training images drawn from its data, as many per brightness "
                                       "level and, within a level, per kind of image (Guttenberg's fine-tune used "
                                       "about 40).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_train_images < 5:
            raise UsageError(f"--num_train_images {self.num_train_images}: at least 5, one per brightness level")


@dataclass(frozen=True)
class SubjectOptions(PriorSetOptions):
    """`experiment subject`'s own options."""

    output_dir: str = option("subject-report", "Report folder.")
    instance_data_dir: str | None = option(
        None, "Images of your subject (required for a base other than the shipped one, whose default subject is "
        "a magenta plus sign it has never seen named).")
    instance_prompt: str = option("a sks object", "The subject's prompt, with its rare token.")
    subject_hue: float | None = option(
        None, "Hue of your subject's main colour in degrees (HSV), for the colour fidelity figure. The shipped "
        "subject is measured by its shape (the shipped VAE cannot make its magenta, hue 307).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.subject_hue is not None and not 0.0 <= self.subject_hue < 360.0:
            raise UsageError(f"--subject_hue {self.subject_hue}: a hue in degrees, 0 <= hue < 360")


@dataclass(frozen=True)
class Experiment:
    """What every experiment's schema holds; each adds its own `experiment` options section. The
    trainer keys an experiment passes to every run are RunConfig's (EXPERIMENT_TRAINER_KEYS)."""

    model: ModelConfig = section(ModelConfig, ("pretrained_model_name_or_path",))
    study: StudyOptions = section(StudyOptions)
    sampling: SamplingConfig = section(SamplingConfig, ("num_inference_steps", "guidance_scale"))


@dataclass(frozen=True)
class BlackImageConfig(Experiment):
    experiment: ExperimentOptions = section(ExperimentOptions)


@dataclass(frozen=True)
class BrightnessRangeConfig(Experiment):
    experiment: RangeOptions = section(RangeOptions)


@dataclass(frozen=True)
class SubjectExperimentConfig(Experiment):
    experiment: SubjectOptions = section(SubjectOptions)


# Trainer keys the experiments take as flags of their own (any other: --set KEY=VALUE).
EXPERIMENT_TRAINER_KEYS = ("resolution", "max_train_steps", "train_batch_size", "rank", "lora_alpha",
                           "learning_rate", "unet_target_modules", "optimizer", "mixed_precision",
                           "gradient_checkpointing")

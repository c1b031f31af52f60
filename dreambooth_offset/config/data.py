"""The `data` section of a training run: where the images and captions come from, how they are
cropped, bucketed, masked and cached (docs/datasets.md)."""
from __future__ import annotations

from dataclasses import dataclass

from dreambooth_offset.config.fields import check_choices, check_positive, option
from dreambooth_offset.errors import UsageError


@dataclass(frozen=True)
class DataConfig:
    instance_data_dir: str = option("", "Folder with the images of the subject (or use --train_data_dir).")
    instance_prompt: str = option("", "Prompt with the identifier, e.g. 'a photo of sks dog' (the caption of "
                                      "--instance_data_dir's images without a caption file).")
    train_data_dir: str = option(
        "", "kohya-style parent folder instead of --instance_data_dir: each subfolder 'N_name' is a concept, its "
        "images seen N times per epoch, captioned 'name' where they have no caption file (docs/datasets.md).")
    reg_data_dir: str = option(
        "", "kohya-style regularisation folders ('N_name', as --train_data_dir): the class images of prior "
        "preservation, used as they are (nothing generated), weighted by --prior_loss_weight.")
    dataset_config: str = option(
        "", "kohya's dataset config TOML ([general], [[datasets]], [[datasets.subsets]] with image_dir, "
        "num_repeats, class_tokens, is_reg, caption options, ...) instead of the folder flags; its resolution, "
        "batch_size, flip_aug and random_crop set the run's (docs/datasets.md).")
    dataset_name: str = option(
        "", "A local dataset that `datasets` reads, as diffusers' scripts take it: an image folder with "
        "metadata.jsonl / metadata.csv, or a save_to_disk folder; nothing is downloaded.")
    image_column: str = option("image", "--dataset_name: the column of images.")
    caption_column: str | None = option(
        None, "--dataset_name: the column of captions. Default: none (every image trains with --instance_prompt).")
    resolution: int | None = option(
        None, "Image side in pixels, a multiple of 8. Default: the model's own (UNet sample_size x the VAE's "
        "downsampling: 512 for SD 1.5, 768 for SD 2.x-v)."
    )
    center_crop: bool = option(False, "Center-crop to the resolution (else a random crop).")
    masked_loss: bool = option(
        False, "Weight the loss per pixel by a mask (white: trained, black: ignored), from --alpha_mask or "
        "--conditioning_data_dir; class images without one count everywhere (kohya's --masked_loss).")
    alpha_mask: bool = option(False, "--masked_loss: the mask is each image's alpha channel (none: all trained).")
    conditioning_data_dir: str = option(
        "", "--masked_loss: a folder of mask images, one per instance image with the same file stem.")
    enable_bucket: bool = option(
        False, "Aspect-ratio buckets (kohya's): each image trains at the size of about resolution^2 pixels whose "
        "aspect ratio is nearest its own, every batch from one bucket; class images take the batch's bucket.")
    min_bucket_reso: int = option(256, "--enable_bucket: the smallest bucket side.")
    max_bucket_reso: int = option(1024, "--enable_bucket: the largest bucket side (SDXL: 2048, as kohya's guide).")
    bucket_reso_steps: int = option(64, "--enable_bucket: bucket sides are multiples of this (a multiple of 8).")
    bucket_no_upscale: bool = option(
        False, "--enable_bucket: buckets of each image's own shape, never larger than the image.")
    random_flip: bool = option(False, "Flip images horizontally at random.")
    train_batch_size: int = option(1, "Instance images per step and process.")
    with_prior_preservation: bool = option(False, "Add class images and a prior-preservation loss.")
    class_data_dir: str = option("", "Folder of class images; missing ones are generated into it.")
    class_prompt: str = option("", "Prompt for the class images, e.g. 'a photo of a dog'.")
    num_class_images: int = option(100, "Class images wanted; the base model generates any missing.")
    prior_loss_weight: float = option(1.0, "Weight of the prior-preservation loss.")
    prior_preservation: str = option(
        "image",
        "What the class rows regress on: 'image', DreamBooth's target from the class image (its noise, or v); "
        "'prediction', the base model's own prediction at the same noisy input with the LoRA switched off "
        "(OneTrainer's prior-prediction concepts, ai-toolkit's differential output preservation), so that "
        "the prior is exact for every class caption, empty ones too (docs/science.md, 'Dark and bright scenes').",
        ("image", "prediction"),
    )
    output_preservation_prompts: tuple[str, ...] = option(
        (), "Output preservation: beside each instance row, one row at the same noisy input (same timestep, same "
        "noise) under the next of these captions, in turn, regressed on what the base predicts there with the LoRA "
        "off (ai-toolkit's differential output preservation). The instance images then teach their own caption "
        "only, not every caption near it; '' is the unconditional branch that guidance extrapolates from. Each "
        "step costs one more forward and backward pass of the instance rows and one forward without the LoRA "
        "(docs/dark-and-bright.md). Default: off.")
    output_preservation_weight: float = option(1.0, "Weight of the output-preservation loss.")
    sample_batch_size: int = option(4, "Batch size when generating class images.")
    caption_extension: str = option(
        "", "Sidecar caption files, kohya style (e.g. '.txt'): an image with 'name.txt' beside it trains "
        "with that caption; one without uses the folder's prompt. Default: off."
    )
    shuffle_caption: bool = option(False, "Shuffle each caption's comma-separated tags every time it is used "
                                          "(after the first --keep_tokens).")
    keep_tokens: int = option(0, "Leading tags of a caption that --shuffle_caption and --caption_tag_dropout_rate "
                                 "leave in place (e.g. the identifier).")
    caption_dropout_rate: float = option(
        0.0, "Chance that a row trains with the empty caption (the unconditional branch that guidance uses).")
    caption_tag_dropout_rate: float = option(0.0, "Chance that each tag after --keep_tokens is left out of a row.")
    caption_prefix: str = option("", "Text put before every caption (after shuffling; not on dropped captions).")
    caption_suffix: str = option("", "Text put after every caption (after shuffling; not on dropped captions).")
    cache_latents: bool = option(
        False, "Encode every image (and its flip) through the VAE once, before the first step, and train from the "
        "stored posteriors; needs fixed crops (--center_crop, or images at the resolution), as kohya's.")
    cache_latents_to_disk: bool = option(
        False, "--cache_latents into --disk_cache_dir, one safetensors file per image, crop and flip, keyed by the "
        "image's bytes, the VAE's weights and the crop: a later run reads them, a changed one is rebuilt.")
    cache_text_encoder_outputs: bool = option(
        False, "Encode every caption once, before the first step (frozen text encoders, fixed captions: no "
        "--shuffle_caption or caption dropout), as kohya's.")
    cache_text_encoder_outputs_to_disk: bool = option(
        False, "--cache_text_encoder_outputs into --disk_cache_dir, keyed by the caption's tokens and the text "
        "encoders' weights.")
    disk_cache_dir: str = option(
        "", "Folder of the disk caches (latents/, text/). Default: $XDG_CACHE_HOME/dreambooth-offset "
        "(~/.cache/dreambooth-offset); entries are keyed by content, so runs and datasets can share it.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise UsageError(f"resolution = {self.resolution}: it must be a positive multiple of 8")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise UsageError(f"caption_extension = {self.caption_extension!r}: it must start with a dot, e.g. '.txt'")
        check_positive(self, "train_batch_size", "sample_batch_size")
        if self.bucket_reso_steps < 8 or self.bucket_reso_steps % 8:
            raise UsageError(f"bucket_reso_steps = {self.bucket_reso_steps}: it must be a positive multiple of 8")
        if not (self.bucket_reso_steps <= self.min_bucket_reso <= self.max_bucket_reso) or \
                self.min_bucket_reso % self.bucket_reso_steps or self.max_bucket_reso % self.bucket_reso_steps:
            raise UsageError(f"min_bucket_reso / max_bucket_reso = {self.min_bucket_reso} / {self.max_bucket_reso}: "
                             f"multiples of bucket_reso_steps ({self.bucket_reso_steps}), min <= max")
        named = [k for k in ("instance_data_dir", "train_data_dir", "reg_data_dir", "class_data_dir") if getattr(self, k)]
        if self.dataset_config and named:
            raise UsageError(f"dataset_config and {named[0]} both set: the dataset file names every image folder")
        sources = [k for k in ("instance_data_dir", "train_data_dir", "dataset_name", "dataset_config") if getattr(self, k)]
        if len(sources) > 1:
            raise UsageError(f"{sources[0]} and {sources[1]} both set: use one source of training images")
        if self.reg_data_dir and self.with_prior_preservation:
            raise UsageError("reg_data_dir and with_prior_preservation both set: reg_data_dir already turns prior "
                             "preservation on, with its images as the class images")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} = {getattr(self, name)}: it must be in [0, 1]")
        if self.masked_loss and not (self.alpha_mask or self.conditioning_data_dir or self.dataset_config):
            raise UsageError("masked_loss needs a mask: alpha_mask, or conditioning_data_dir (a folder of masks)")
        if (self.alpha_mask or self.conditioning_data_dir) and not self.masked_loss:
            raise UsageError(f"{'alpha_mask' if self.alpha_mask else 'conditioning_data_dir'} is a mask for "
                             "masked_loss, which is off: add masked_loss")
        if self.alpha_mask and self.conditioning_data_dir:
            raise UsageError("alpha_mask and conditioning_data_dir both set: one source of masks")
        if self.keep_tokens < 0:
            raise UsageError(f"keep_tokens = {self.keep_tokens}: it must be 0 or more")
        if self.prior_preservation != "image" and not self.has_prior:
            raise UsageError(f"prior_preservation = {self.prior_preservation!r} needs with_prior_preservation "
                             "(and class images) or reg_data_dir")
        if self.output_preservation_weight < 0:
            raise UsageError(f"output_preservation_weight = {self.output_preservation_weight}: it must be 0 or more")
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise UsageError("with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')")
            if not self.class_data_dir:
                raise UsageError("with_prior_preservation needs class_data_dir (a folder for class images)")
            if self.num_class_images < 1:
                raise UsageError("num_class_images must be at least 1 with prior preservation")

    @property
    def caches_latents(self) -> bool:
        return self.cache_latents or self.cache_latents_to_disk  # kohya: the disk cache implies the cache

    @property
    def caches_text(self) -> bool:
        return self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk

    @property
    def has_prior(self) -> bool:
        """Class rows in every batch: generated/given class images, or kohya's reg folders."""
        return self.with_prior_preservation or bool(self.reg_data_dir)

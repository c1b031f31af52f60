"""Config sections for the training noise (noise/noise.py) and the loss (noise/objective.py)."""
from __future__ import annotations

from dataclasses import dataclass

from dreambooth_offset.config.fields import check_choices, option
from dreambooth_offset.errors import UsageError


# Keys that only modify the offset noise, with the value that leaves it unmodified.
OFFSET_MODIFIERS = {"noise_offset_random_strength": False, "adaptive_noise_scale": None,
                    "noise_offset_probability": 1.0, "noise_offset_variance_preserving": False}


@dataclass(frozen=True)
class NoiseConfig:
    """How the training noise is drawn (noise/noise.py). Formulas: docs/science.md; every option: docs/noise-options.md."""

    noise_offset: float | str | None = option(
        None,
        "Offset-noise strength o: one N(0, o^2) shift per (sample, channel) added to the noise "
        "(Guttenberg 2023). 0 disables it. 'auto': the smallest o that closes the train/inference "
        "brightness gap of the training images (written to noise_offset_auto.json). Default: the "
        "model family's, 0.1 for SD 1.x/2.x (Guttenberg's value), 0.0357 for SDXL, whose base was "
        "itself trained with offset noise (kohya's recommendation; docs/sdxl.md).",
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
        check_choices(self)
        offset = self.noise_offset
        if offset is None:  # the family's default, resolved with the model (training/family.py)
            pass
        elif isinstance(offset, str):
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
                "above 0 (0.1 for SD, 0.0357 for SDXL), so pass --noise_offset 0 explicitly to use pyramid noise"
            )
        if not self.offset_used:
            for key, off in OFFSET_MODIFIERS.items():
                if getattr(self, key) != off:
                    raise UsageError(f"{key} modifies the offset noise, but noise_offset = 0: "
                                     "set noise_offset > 0 (or 'auto'), or drop it")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise UsageError("ip_noise_gamma_random_strength needs ip_noise_gamma > 0 (e.g. --ip_noise_gamma 0.1)")

    @property
    def offset_used(self) -> bool:
        """Whether any step of the run draws offset noise (the family defaults are all above 0)."""
        offset = self.noise_offset
        return offset is None or offset == "auto" or offset > 0 or bool(self.noise_offset_end)


@dataclass(frozen=True)
class LossConfig:
    """What the UNet regresses on and how the error is weighted (noise/objective.py)."""

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
    min_timestep: int = option(0, "Train on timesteps >= this (kohya --min_timestep).")
    max_timestep: int | None = option(
        None, "Train on timesteps < this (kohya --max_timestep). Default: the scheduler's num_train_timesteps.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UsageError(f"snr_gamma = {self.snr_gamma}: it must be > 0 (5 is the paper's value)")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise UsageError(f"min_timestep = {self.min_timestep}, max_timestep = {self.max_timestep}: "
                             "they must satisfy 0 <= min_timestep < max_timestep")
        if self.huber_c <= 0:
            raise UsageError(f"huber_c = {self.huber_c}: it must be > 0")
        if self.huber_schedule != "constant" and self.huber_c > 1:
            raise UsageError(f"huber_c = {self.huber_c}: with huber_schedule {self.huber_schedule!r} it must be in (0, 1]")


def check_zero_terminal_snr(noise: NoiseConfig, loss: LossConfig) -> None:
    """Zero terminal SNR needs v-prediction: the one check behind `train` and `generate`."""
    if noise.zero_terminal_snr and loss.prediction_type != "v_prediction":
        raise UsageError(
            f"zero_terminal_snr needs prediction_type = 'v_prediction' (got {loss.prediction_type!r}): "
            "at the last timestep the input is pure noise, so an epsilon target equals the input and teaches "
            "nothing, and the sampler's x0 = (x_T - s_T * eps) / a_T divides by a_T = 0 (Lin et al. 2023). "
            "Pass --prediction_type v_prediction"
        )

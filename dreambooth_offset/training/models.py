"""Load Stable Diffusion parts from a local folder (or the local hub cache), freeze and encode."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from dreambooth_offset.config import ModelConfig
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training import single_file
from dreambooth_offset.training.family import SD, SDXL, family_of


class SDParts(NamedTuple):
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (with projection)
    text_encoder_2: torch.nn.Module | None = None

    @property
    def family(self) -> str:
        return SDXL if self.text_encoder_2 is not None else SD

    @property
    def tokenizers(self) -> tuple:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(t for t in (self.text_encoder, self.text_encoder_2) if t is not None)


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder as given, or a hub id resolved to its snapshot in the local cache; never the network."""
    name = cfg.pretrained_model_name_or_path
    if not name:
        raise UsageError("--pretrained_model_name_or_path is required (a diffusers folder or a cached hub id)")
    root = resolve_local(name, cfg.revision, "model folder")
    path = Path(root)
    if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise UsageError(f"{name} is not a diffusers Stable Diffusion folder (no model_index.json or unet/)")
    return root


def resolve_local(name: str, revision: str | None, what: str) -> str:
    """A local folder as given, or a hub id's snapshot in the local cache; `what` names it in errors."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise UsageError(f"{what} {name} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise UsageError(
            f"{name} is neither a local folder nor in the local hub cache; "
            "download it once (e.g. `hf download`) or pass a local diffusers folder"
        ) from None


def model_name(name_or_path: str) -> str:
    """What a shared file may say about its base: the hub id as given, or a local folder's (or
    file's) own name, never the path that leads to it (`ss_sd_model_name`)."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.exists() else name_or_path


def training_scheduler(scheduler_config, zero_terminal_snr: bool = False, prediction_type: str | None = None):
    """A DDPMScheduler from a scheduler config, with the betas rescaled to zero terminal SNR
    (Lin et al. 2023, diffusers' `rescale_betas_zero_snr`) and/or another `prediction_type`.

    The overrides land in the scheduler's config, so samplers built `from_config` inherit them."""
    from diffusers import DDPMScheduler

    overrides: dict[str, object] = {}
    if zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    if prediction_type is not None:
        overrides["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(scheduler_config, **overrides)


def load_parts(cfg: ModelConfig, zero_terminal_snr: bool = False, prediction_type: str | None = None) -> SDParts:
    """Tokenizer(s), text encoder(s), VAE, UNet and the DDPM training scheduler, from local files
    only: a diffusers folder (SDXL's second tokenizer and encoder when it is SDXL, `family.family_of`)
    or a single-file checkpoint (`single_file`).

    `zero_terminal_snr` / `prediction_type` adjust the scheduler (`training_scheduler`)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    # safetensors only: a folder that has only pickled weights (.bin) is refused, never unpickled
    weights = {"local_files_only": True, "variant": cfg.variant, "use_safetensors": True}
    name = cfg.pretrained_model_name_or_path
    try:
        if name and single_file.is_single_file(name):
            components, root = single_file.load_components(name, cfg.single_file_config)
        else:
            root = resolve_model_path(cfg)
            components = folder_components(root, weights)
        noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        if cfg.pretrained_vae_model_name_or_path:
            name = cfg.pretrained_vae_model_name_or_path
            vae_root = resolve_local(name, None, "--pretrained_vae_model_name_or_path")
            components["vae"] = AutoencoderKL.from_pretrained(vae_root, **{**weights, "variant": None})
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {name}: {first_line}") from None
    parts = SDParts(noise_scheduler=noise_scheduler, **{k: components.get(k) for k in SDParts._fields
                                                       if k != "noise_scheduler"})
    for module in (parts.vae, parts.unet, *parts.text_encoders):
        module.requires_grad_(False)
        module.eval()
    if zero_terminal_snr or prediction_type is not None:
        parts = parts._replace(noise_scheduler=training_scheduler(noise_scheduler.config, zero_terminal_snr,
                                                                  prediction_type))
    return parts


def folder_components(root: str, weights: dict) -> dict:
    """Tokenizer(s), text encoder(s), UNet and VAE of a diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    components = {"tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
                  "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **weights)}
    if family_of(root) == SDXL:
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True)
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", **weights)
    components["unet"] = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **weights)
    components["vae"] = AutoencoderKL.from_pretrained(root, subfolder="vae", **weights)
    return components


def latent_distribution(vae: torch.nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) of the VAE's diagonal Gaussian posterior for pixels in [-1, 1], fp32."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def scale_latents(latents: Tensor, vae_config) -> Tensor:
    """VAE latents into the UNet's space: minus `shift_factor` (if any), times `scaling_factor`."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def unscale_latents(latents: Tensor, vae_config) -> Tensor:
    """The inverse of `scale_latents`: UNet latents back into the VAE's space, for decoding."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return latents / vae_config.scaling_factor + shift


def decode_images(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Latents in the VAE's space (see `unscale_latents`) decoded to images in [0, 1], fp32 on the CPU."""
    decoded = vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample
    return (decoded.float().cpu() / 2 + 0.5).clamp(0, 1)


def native_resolution(unet_config, vae_config) -> int:
    """The image side a model was made for: the UNet's sample_size times the VAE's downsampling."""
    return unet_config.sample_size * 2 ** (len(vae_config.block_out_channels) - 1)


def sample_latents(mean: Tensor, std: Tensor, vae_config, generator: torch.Generator) -> Tensor:
    """A posterior draw, scaled into the UNet's latent space (`scale_latents`)."""
    eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
    return scale_latents(mean + std * eps, vae_config)

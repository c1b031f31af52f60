"""LoRA through peft: inject adapters, collect their weights, write the diffusers LoRA file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from dreambooth_offset.config import AdapterConfig
from dreambooth_offset.errors import UsageError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for


def weight_name(network_type: str = "lora") -> str:
    """The output file of an adapter type: diffusers' name for LoRA; `pytorch_loha_weights` /
    `pytorch_lokr_weights.safetensors`, the same layout (component-prefixed peft keys, the peft
    configs in the header), for LoHa / LoKr, which diffusers does not load."""
    return f"pytorch_{network_type}_weights.safetensors"


def _lora_config(cfg: AdapterConfig, target_modules: tuple[str, ...]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.network_type != "lora":  # their init makes the update zero, as LoRA's does
        config = LoHaConfig if cfg.network_type == "loha" else LoKrConfig
        return config(r=cfg.rank, alpha=cfg.alpha, target_modules=list(target_modules), init_weights=True)
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        use_dora=cfg.use_dora,
        init_lora_weights="gaussian",  # as diffusers' train_dreambooth_lora.py
        target_modules=list(target_modules),
    )


def add_adapters(unet: torch.nn.Module, cfg: AdapterConfig, *text_encoders: torch.nn.Module | None) -> None:
    """Add LoRA to the UNet (and each text encoder given). Only the LoRA parameters train."""
    for model, targets, flag in (
        (unet, cfg.unet_target_modules, "unet_target_modules"),
        *((t, cfg.text_encoder_target_modules, "text_encoder_target_modules") for t in text_encoders),
    ):
        if model is None:
            continue
        try:
            model.add_adapter(_lora_config(cfg, targets))
        except ValueError as err:
            raise UsageError(f"--{flag} {' '.join(targets)}: {str(err).splitlines()[0]}") from None


@contextmanager
def adapters_off(*models: torch.nn.Module | None) -> Iterator[None]:
    """The base models inside the block: every adapter of `models` (peft's, unwrapped from DDP)
    switched off, and on again after it. Models without adapters (frozen encoders) are passed over."""
    plain = [getattr(m, "module", m) for m in models if m is not None]
    plain = [m for m in plain if getattr(m, "peft_config", None)]
    for model in plain:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in plain:
            model.enable_adapters()


def trainable_parameters(*models: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def adapter_state(model, dtype: torch.dtype = torch.float32) -> dict | None:
    """A model's adapter weights with peft's key names (`...to_q.lora_A.weight`), on CPU, in
    `dtype` (fp32 unless --save_precision says otherwise); None for None.

    Not passed through `convert_state_dict_to_diffusers`: it renames attention keys to the old
    `lora.down` style but leaves conv keys as `lora_A`, and diffusers' loader cannot read the mix.
    `load_lora_weights` reads peft-named keys directly.
    """
    from peft.utils import get_peft_model_state_dict

    if model is None:
        return None
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # LoRA only, never embeddings
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def lora_state_dicts(unet, text_encoder=None) -> tuple[dict, dict | None]:
    """`adapter_state` of the UNet and the (first) text encoder."""
    return adapter_state(unet), adapter_state(text_encoder)


# Written into the file's adapter metadata even when equal to LoraConfig's defaults.
CORE_ADAPTER_KEYS = ("r", "lora_alpha", "target_modules")


def adapter_metadata(model) -> dict | None:
    """The LoraConfig as a dict, which diffusers stores in the file so that loading restores
    alpha/rank: the core keys and every setting that differs from LoraConfig's default. Unset
    settings stay out because loading calls `LoraConfig(**metadata)`, which an older peft refuses
    for a field it does not know even when the value is None (peft 0.22 writes `astra_config`,
    and peft 0.21 could not load the file)."""
    if model is None:
        return None
    config = model.peft_config["default"]
    defaults = type(config)().to_dict()
    meta = {k: v for k, v in config.to_dict().items() if k in CORE_ADAPTER_KEYS or v != defaults[k]}
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def _text_encoder_keys(state: dict | None) -> dict | None:
    """A text encoder's DoRA magnitudes under `lora_magnitude_vector.weight`: transformers'
    `load_adapter`, which diffusers loads text encoders through, finds them only there (peft's state
    dict, and the UNet's loader, use `lora_magnitude_vector`)."""
    if state is None:
        return None
    return {f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}


def write_diffusers_lora(directory: str | Path, unet_state: dict | None, text_encoder_state: dict | None = None,
                         unet_metadata: dict | None = None, text_encoder_metadata: dict | None = None,
                         text_encoder_2_state: dict | None = None, text_encoder_2_metadata: dict | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (what `load_lora_weights` reads) into `directory`
    atomically: diffusers writes into a temporary folder on the same file system, and the finished
    file replaces the old one with `os.replace`, so a crash never leaves a half-written file.

    The states are peft-named (`...to_q.lora_A.weight`); the metadata are LoraConfig dicts, which
    diffusers stores in the file so that loading restores alpha and rank. SDXL's second text
    encoder goes under `text_encoder_2.`; the other keys are the same for both families."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text_encoder_state, text_encoder_2_state = map(_text_encoder_keys, (text_encoder_state, text_encoder_2_state))
    second = {}
    if text_encoder_2_state:
        second = {"text_encoder_2_lora_layers": text_encoder_2_state,
                  "text_encoder_2_lora_adapter_metadata": text_encoder_2_metadata}
    saver = StableDiffusionXLPipeline if second else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-lora-") as tmp:
        saver.save_lora_weights(
            tmp, unet_lora_layers=unet_state, text_encoder_lora_layers=text_encoder_state,
            unet_lora_adapter_metadata=unet_metadata, text_encoder_lora_adapter_metadata=text_encoder_metadata,
            safe_serialization=True, **second,
        )
        target = directory / LORA_WEIGHT_NAME
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, target)
    return target


def save_lora(directory: str | Path, unet, text_encoder=None, text_encoder_2=None,
              dtype: torch.dtype = torch.float32) -> Path:
    """The adapters of `unet` (and the text encoders given) as the diffusers LoRA file in `directory`
    (LoHa / LoKr: `weight_name`'s file, written atomically)."""
    network_type = str(unet.peft_config["default"].peft_type.value).lower()
    if network_type != "lora":
        from dreambooth_offset.webui.metadata import write_webui_file

        models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        tensors = {f"{c}.{k}": v for c, m in models.items() if m is not None for k, v in adapter_state(m, dtype).items()}
        configs = {c: adapter_metadata(m) for c, m in models.items() if m is not None}
        path = Path(directory) / weight_name(network_type)
        write_webui_file(path, tensors, {"adapter_metadata": json.dumps(configs, default=str)})
        return path
    return write_diffusers_lora(directory, adapter_state(unet, dtype), adapter_state(text_encoder, dtype),
                                adapter_metadata(unet), adapter_metadata(text_encoder),
                                adapter_state(text_encoder_2, dtype), adapter_metadata(text_encoder_2))


def adapter_file(directory: str | Path) -> Path:
    """The adapter file in `directory`: the LoRA one, else a LoHa / LoKr one (the LoRA name when none is there)."""
    directory = Path(directory)
    return next((directory / weight_name(t) for t in ("lora", "loha", "lokr") if (directory / weight_name(t)).is_file()),
                directory / LORA_WEIGHT_NAME)


def load_adapter_file(path: str | Path, models: dict[str, torch.nn.Module | None]) -> None:
    """Put a LoHa / LoKr file's weights (`save_lora`'s layout) into the adapters of `models`
    (component -> model, as in the file's key prefixes)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(path)
    for component, model in models.items():
        if model is not None:
            prefix = component + "."
            set_peft_model_state_dict(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

"""What the WebUIs' LoRA loaders accept, restated from their documented rules (module docs of
webui/keys.py): per loader, the module names it can place in a base model, and a report of a
file's keys against them. The loaders cannot run in the tests; `inspect` and `export` print this."""
from __future__ import annotations

import functools
import re
from typing import Iterable

from dreambooth_offset.webui.keys import (
    BASES, CLIP_LORA_MAP, SD1_LAYOUT, SDXL_LAYOUT, SDXL_TEXT_ENCODER_2, TEXT_ENCODER_LAYERS, _kohya, _openclip,
    a1111_module_name, clip_text_modules, ldm_unet_modules, sd_unet_modules,
)


def a1111_sdxl_module_name(lora_name: str) -> str:
    """The module name A1111 looks up for an SDXL LoRA name (SGM UNet names, two text encoders)."""
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lora_name):
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
    if lora_name.startswith("lora_te1_text_model_"):
        return "0_transformer_text_model_" + lora_name[len("lora_te1_text_model_"):]
    return lora_name.replace("lora_unet_", "diffusion_model_", 1)


def _openclip_modules(prefix: str, layers: int) -> set[str]:
    """OpenCLIP resblock module names as A1111 holds them: q/k/v live in one fused `attn` (in_proj),
    found by stripping `_q_proj` etc."""
    return {f"{prefix}model_transformer_resblocks_{i}_{p}" for i in range(layers)
            for p in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}


def _comfy_text(prefix: str, layers: int) -> set[str]:
    return {f"{prefix}text_model_encoder_layers_{i}_{c}" for i in range(layers) for c in CLIP_LORA_MAP}


@functools.lru_cache(maxsize=None)
def _accepted(base: str) -> dict[str, frozenset[str]]:
    """Per loader, the LoRA module names it can place in a `base` model."""
    sdxl, layers = base == "sdxl", TEXT_ENCODER_LAYERS[base]
    layout = SDXL_LAYOUT if sdxl else SD1_LAYOUT
    ldm = ldm_unet_modules(layout)
    if sdxl:
        a1111_te = {"0_transformer_" + n.replace(".", "_") for n in clip_text_modules(layers)}
        a1111_te |= _openclip_modules("1_", SDXL_TEXT_ENCODER_2[0])
        comfy_te = _comfy_text("lora_te1_", layers) | _comfy_text("lora_te2_", SDXL_TEXT_ENCODER_2[0])
    else:
        a1111_te = (_openclip_modules("", layers) if BASES[base].v2 else
                    {"transformer_" + n.replace(".", "_") for n in clip_text_modules(layers)})
        comfy_te = _comfy_text("lora_te_", layers) | _comfy_text("lora_te1_", layers)
    comfy_unet = {_kohya("lora_unet_", n) for n in sd_unet_modules(sdxl)
                  if a1111_module_name(_kohya("lora_unet_", n), layout=layout) in ldm}
    comfy_unet |= {n.replace("diffusion_model_", "lora_unet_", 1) for n in ldm}
    return {"A1111": frozenset(ldm | a1111_te), "ComfyUI/Forge": frozenset(comfy_unet | comfy_te)}


def a1111_accepts(lora_name: str, base: str) -> bool:
    modules = _accepted(base)["A1111"]
    if base == "sdxl":  # its diffusers-name rules first (SD 1.x's layout), then the SDXL fallbacks
        names = (a1111_module_name(lora_name), a1111_sdxl_module_name(lora_name))
    else:
        names = (a1111_module_name(lora_name, BASES[base].v2), lora_name.replace("lora_unet", "diffusion_model", 1))
    return any(n in modules or re.sub(r"_[qkv]_proj$", "", n) in modules for n in names)


def key_map_report(keys: Iterable[str], base: str) -> dict[str, tuple[int, list[str]]]:
    """Per WebUI loader: how many of the file's keys it matches, and the keys it does not.

    A `dora_scale` (out, 1[, 1, 1]) counts as unmatched for A1111: its `apply_weight_decompose`
    normalises per input column only, so an output-axis magnitude would broadcast into a wrong
    weight (ComfyUI and Forge pick the axis from the shape)."""
    keys = list(keys)
    checks = {"A1111": lambda k: a1111_accepts(k.split(".", 1)[0], base) and not k.endswith(".dora_scale"),
              "ComfyUI/Forge": lambda k: k.split(".", 1)[0] in _accepted(base)["ComfyUI/Forge"]}
    report = {}
    for loader, accepts in checks.items():
        unmatched = [k for k in keys if not accepts(k)]
        report[loader] = (len(keys) - len(unmatched), unmatched)
    return report


def a1111_sd_version(metadata: dict[str, str]) -> str:
    """A1111's Lora extension's base detection from metadata (network.py, detect_version)."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"

"""What the WebUIs call a LoRA's modules, and which names their loaders accept.

A kohya-format ("WebUI") LoRA key is `<prefix><module path, "." -> "_">.<part>`, with prefix
`lora_unet_` or `lora_te_` (SD 1.x/2.x text encoder; SDXL uses `lora_te1_`/`lora_te2_`) and part
`lora_down.weight`, `lora_up.weight` or `alpha`. Module paths are diffusers' UNet2DConditionModel
names and Hugging Face CLIPTextModel names under `text_model.`, as kohya's sd-scripts writes them.

The loader checks restate the documented rules of each loader in our own code:
- AUTOMATIC1111's built-in Lora extension renames a diffusers-style name to the CompVis/LDM module
  name of the loaded checkpoint (`convert_diffusers_name_to_compvis`), then looks that name up
  among the model's modules; a name it cannot convert is tried as `lora_unet_` -> `diffusion_model_`.
- ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip` (Forge reuses them) accept
  `lora_unet_` + the diffusers or the LDM name of any UNet weight, and
  `lora_te_text_model_encoder_layers_{i}_{mlp_fc1|mlp_fc2|self_attn_{q,k,v,out}_proj}`.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, NamedTuple

from dreambooth_offset.training.architectures import SD15_UNET_CONFIG


class BaseModel(NamedTuple):
    version: str  # kohya's ss_base_model_version
    v2: bool  # kohya's ss_v2: A1111 shows a LoRA for SD2 models only when this is "True"
    architecture: str  # SAI model spec id of the base, before "/lora"
    prediction_type: str
    resolution: int
    cross_attention_dim: int  # tells the bases apart from the LoRA's own shapes


BASES = {
    "sd_v1": BaseModel("sd_v1", False, "stable-diffusion-v1", "epsilon", 512, 768),
    "sd_v2": BaseModel("sd_v2", True, "stable-diffusion-v2-512", "epsilon", 512, 1024),
    "sd_v2_v": BaseModel("sd_v2_v", True, "stable-diffusion-v2-768-v", "v", 768, 1024),
}

CLIP_LORA_MAP = ("mlp_fc1", "mlp_fc2", "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
TEXT_ENCODER_LAYERS = {"sd_v1": 12, "sd_v2": 24, "sd_v2_v": 24}  # as the WebUIs load them

# LDM ResBlock names of diffusers' ResnetBlock2D parts (A1111's suffix_conversion).
_RESNET_TO_LDM = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection", "norm1": "in_layers_0", "norm2": "out_layers_0",
}


def a1111_module_name(lora_name: str, is_sd2: bool = False) -> str:
    """The module name A1111 looks up for a kohya LoRA name; names without a rule come back as is."""
    def block(kind: str, rest: str) -> str:
        return _RESNET_TO_LDM.get(rest, rest) if kind == "resnets" else rest

    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{2 * int(m[1]) - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{int(m[2] == 'attentions')}_{block(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_{block(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"output_blocks_{3 * int(m[1]) + int(m[3])}_{int(m[2] == 'attentions')}_{block(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{3 + 3 * int(m[1])}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:
            f"output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
    )
    for pattern, rename in rules:
        if m := re.fullmatch(pattern, lora_name):
            return "diffusion_model_" + rename(m)
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lora_name):
        if not is_sd2:
            return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"model_transformer_resblocks_{m[1]}_{rest}"
    return lora_name


def ldm_unet_modules(channels=(320, 640, 1280, 1280), layers_per_block=2, attention_levels=(0, 1, 2)) -> set[str]:
    """Linear/Conv2d module names of the CompVis/LDM SD 1.x/2.x UNet, as A1111 names them."""
    res = ("in_layers_2", "emb_layers_1", "out_layers_3")
    attn = ("proj_in", "proj_out", "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2",
            *(f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")))
    names = {"time_embed_0", "time_embed_2", "input_blocks_0_0", "out_2"}
    i = 1
    for level, ch in enumerate(channels):
        for j in range(layers_per_block):
            names |= {f"input_blocks_{i}_0_{r}" for r in res}
            if j == 0 and level > 0 and channels[level - 1] != ch:  # the channel count changes here
                names.add(f"input_blocks_{i}_0_skip_connection")
            if level in attention_levels:
                names |= {f"input_blocks_{i}_1_{a}" for a in attn}
            i += 1
        if level < len(channels) - 1:
            names.add(f"input_blocks_{i}_0_op")
            i += 1
    names |= {f"middle_block_{b}_{r}" for b in (0, 2) for r in res} | {f"middle_block_1_{a}" for a in attn}
    o = 0
    for level in reversed(range(len(channels))):
        for j in range(layers_per_block + 1):  # the output ResBlocks take skip-concatenated input
            names |= {f"output_blocks_{o}_0_{r}" for r in (*res, "skip_connection")}
            if level in attention_levels:
                names |= {f"output_blocks_{o}_1_{a}" for a in attn}
            if j == layers_per_block and level > 0:
                names.add(f"output_blocks_{o}_{2 if level in attention_levels else 1}_conv")
            o += 1
    return {"diffusion_model_" + n for n in names}


@functools.lru_cache(maxsize=None)
def sd_unet_modules() -> dict[str, tuple[int, ...]]:
    """diffusers' SD 1.5 UNet Linear/Conv2d module names -> weight shapes (built on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return {n: tuple(m.weight.shape) for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@functools.lru_cache(maxsize=None)
def clip_text_modules(layers: int = 12, hidden: int = 768) -> dict[str, tuple[int, ...]]:
    """CLIP text encoder Linear module names (with the `text_model.` root) -> weight shapes."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                            num_hidden_layers=layers, max_position_embeddings=77)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return {canonical_text_encoder_path(n): tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def canonical_text_encoder_path(path: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; the WebUIs' names keep it."""
    return path if path.startswith("text_model.") else "text_model." + path


def _kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


@functools.lru_cache(maxsize=None)
def _accepted(base: str) -> dict[str, frozenset[str]]:
    """Per loader, the LoRA module names it can place in a `base` model."""
    is_sd2 = BASES[base].v2
    layers = TEXT_ENCODER_LAYERS[base]
    ldm = ldm_unet_modules()
    if is_sd2:  # OpenCLIP: q/k/v live in one in_proj; A1111 strips "_q_proj" etc. to find it
        a1111_te = {f"model_transformer_resblocks_{i}_{p}" for i in range(layers)
                    for p in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}
    else:
        a1111_te = {"transformer_" + n.replace(".", "_") for n in clip_text_modules(layers)}
    comfy_te = {f"{p}text_model_encoder_layers_{i}_{c}" for p in ("lora_te_", "lora_te1_")
                for i in range(layers) for c in CLIP_LORA_MAP}
    comfy_unet = {_kohya("lora_unet_", n) for n in sd_unet_modules()
                  if a1111_module_name(_kohya("lora_unet_", n)) in ldm}
    comfy_unet |= {n.replace("diffusion_model_", "lora_unet_", 1) for n in ldm}
    return {"A1111": frozenset(ldm | a1111_te), "ComfyUI/Forge": frozenset(comfy_unet | comfy_te)}


def a1111_accepts(lora_name: str, base: str) -> bool:
    modules = _accepted(base)["A1111"]
    name = a1111_module_name(lora_name, BASES[base].v2)
    if name in modules or re.sub(r"_[qkv]_proj$", "", name) in modules:
        return True
    return lora_name.replace("lora_unet", "diffusion_model", 1) in modules


def key_map_report(keys: Iterable[str], base: str) -> dict[str, tuple[int, list[str]]]:
    """Per WebUI loader: how many of the file's keys it matches, and the keys it does not."""
    keys = list(keys)
    checks = {"A1111": lambda n: a1111_accepts(n, base),
              "ComfyUI/Forge": lambda n: n in _accepted(base)["ComfyUI/Forge"]}
    report = {}
    for loader, accepts in checks.items():
        unmatched = [k for k in keys if not accepts(k.split(".", 1)[0])]
        report[loader] = (len(keys) - len(unmatched), unmatched)
    return report


def a1111_sd_version(metadata: dict[str, str]) -> str:
    """A1111's Lora extension's base detection from metadata (network.py, detect_version)."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def base_for(cross_attention_dim: int, prediction_type: str = "epsilon") -> str | None:
    """The BASES key for a UNet's `cross_attention_dim` and its scheduler's `prediction_type`, or None."""
    if cross_attention_dim == 1024:
        return "sd_v2_v" if prediction_type in ("v_prediction", "v") else "sd_v2"
    return "sd_v1" if cross_attention_dim == 768 else None


def infer_base(cross_attention_dims: Iterable[int]) -> str | None:
    """sd_v1 or sd_v2 from the context width the LoRA's attn2.to_k/to_v (or text encoder) reads."""
    dims = set(cross_attention_dims)
    found = {name for name, b in BASES.items() if b.cross_attention_dim in dims and name != "sd_v2_v"}
    return found.pop() if len(found) == 1 and len(dims) == 1 else None


@functools.lru_cache(maxsize=None)
def ldm_to_diffusers_names() -> dict[str, str]:
    """Old LoRA files named after the LDM UNet (`lora_unet_input_blocks_1_1_...`) -> diffusers names."""
    table = {}
    for path in sd_unet_modules():
        name = _kohya("lora_unet_", path)
        ldm = a1111_module_name(name)
        if ldm != name:
            table[ldm.replace("diffusion_model_", "lora_unet_", 1)] = name
    return table

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
  `lora_te_text_model_encoder_layers_{i}_{mlp_fc1|mlp_fc2|self_attn_{q,k,v,out}_proj}`
  (`lora_te1_` / `lora_te2_` for SDXL's two encoders, both under Hugging Face CLIP names).
- SDXL files name the UNet modules by the SGM (LDM) UNet, as kohya's sd-scripts writes them
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`): A1111 only swaps `lora_unet_`
  for `diffusion_model_` there, as its diffusers-name rules assume SD 1.x's block layout;
  `lora_te1_text_model_` becomes `0_transformer_text_model_`, and `lora_te2_` names are renamed to
  OpenCLIP's (`1_model_transformer_resblocks_{i}_...`, q/k/v into the fused `attn`).
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, NamedTuple

from dreambooth_offset.training.architectures import SD15_UNET_CONFIG, SDXL_UNET_CONFIG


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
    "sdxl": BaseModel("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base", "epsilon", 1024, 2048),
}

CLIP_LORA_MAP = ("mlp_fc1", "mlp_fc2", "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
TEXT_ENCODER_LAYERS = {"sd_v1": 12, "sd_v2": 24, "sd_v2_v": 24, "sdxl": 12}  # as the WebUIs load them
SDXL_TEXT_ENCODER_2 = (32, 1280)  # OpenCLIP ViT-bigG: layers, width


class UNetLayout(NamedTuple):
    """What a UNet's LDM/SGM module names depend on (not its widths)."""

    layers_per_block: int
    attention: tuple[bool, ...]  # per down level: has transformer blocks (the up levels mirror it)
    depths: tuple[int, ...]  # transformer blocks per level
    mid_depth: int
    widens: tuple[bool, ...]  # per level: its first ResBlock changes the channel count
    label_emb: bool  # SDXL's size/pooled-text embedding (add_embedding)


def layout_of(config) -> UNetLayout:
    """The layout of a diffusers UNet config (a dict or the model's FrozenDict)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    channels = tuple(get("block_out_channels"))
    depth = get("transformer_layers_per_block", 1) or 1
    depths = tuple(depth) if isinstance(depth, (list, tuple)) else (depth,) * len(channels)
    return UNetLayout(
        get("layers_per_block"), tuple("CrossAttn" in t for t in get("down_block_types")), depths, depths[-1],
        tuple(i > 0 and channels[i - 1] != c for i, c in enumerate(channels)),
        get("addition_embed_type") == "text_time")


SD1_LAYOUT, SDXL_LAYOUT = layout_of(SD15_UNET_CONFIG), layout_of(SDXL_UNET_CONFIG)

# LDM ResBlock names of diffusers' ResnetBlock2D parts (A1111's suffix_conversion).
_RESNET_TO_LDM = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection", "norm1": "in_layers_0", "norm2": "out_layers_0",
}


def a1111_module_name(lora_name: str, is_sd2: bool = False, layout: UNetLayout = SD1_LAYOUT) -> str:
    """The LDM/SGM module name of a kohya LoRA name in diffusers naming; names without a rule come
    back as is. With SD 1.x's layout this is A1111's own renaming; with SDXL's, the SGM name that
    kohya's sd-scripts writes for SDXL (`lora_unet_` + it, without `diffusion_model_`)."""
    def block(kind: str, rest: str) -> str:
        return _RESNET_TO_LDM.get(rest, rest) if kind == "resnets" else rest

    n, levels = layout.layers_per_block + 1, len(layout.attention)
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{2 * int(m[1]) - 2}{m[2]}"),
        (r"lora_unet_add_embedding_linear_(\d+)(.*)", lambda m: f"label_emb_0_{2 * int(m[1]) - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"input_blocks_{1 + n * int(m[1]) + int(m[3])}_{int(m[2] == 'attentions')}_{block(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_{block(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"output_blocks_{n * int(m[1]) + int(m[3])}_{int(m[2] == 'attentions')}_{block(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{n * (int(m[1]) + 1)}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:  # after the level's attention, if any
            f"output_blocks_{n * int(m[1]) + n - 1}_{2 if layout.attention[levels - 1 - int(m[1])] else 1}_conv"),
    )
    for pattern, rename in rules:
        if m := re.fullmatch(pattern, lora_name):
            return "diffusion_model_" + rename(m)
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lora_name):
        if not is_sd2:
            return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        return f"model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
    return lora_name


def _openclip(rest: str) -> str:
    """A Hugging Face CLIP layer's part name as OpenCLIP's resblock names it (A1111's rule)."""
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


def ldm_unet_modules(layout: UNetLayout = SD1_LAYOUT) -> set[str]:
    """Linear/Conv2d module names of the CompVis/LDM (SGM) UNet of `layout`, as A1111 names them."""
    res = ("in_layers_2", "emb_layers_1", "out_layers_3")

    def attn(depth: int) -> tuple[str, ...]:
        return ("proj_in", "proj_out", *(f"transformer_blocks_{k}_{p}" for k in range(depth) for p in (
            "ff_net_0_proj", "ff_net_2",
            *(f"{a}_{q}" for a in ("attn1", "attn2") for q in ("to_q", "to_k", "to_v", "to_out_0")))))

    names = {"time_embed_0", "time_embed_2", "input_blocks_0_0", "out_2"}
    if layout.label_emb:
        names |= {"label_emb_0_0", "label_emb_0_2"}
    levels, i = len(layout.attention), 1
    for level in range(levels):
        for j in range(layout.layers_per_block):
            names |= {f"input_blocks_{i}_0_{r}" for r in res}
            if j == 0 and layout.widens[level]:
                names.add(f"input_blocks_{i}_0_skip_connection")
            if layout.attention[level]:
                names |= {f"input_blocks_{i}_1_{a}" for a in attn(layout.depths[level])}
            i += 1
        if level < levels - 1:
            names.add(f"input_blocks_{i}_0_op")
            i += 1
    names |= {f"middle_block_{b}_{r}" for b in (0, 2) for r in res} | {f"middle_block_1_{a}" for a in attn(layout.mid_depth)}
    o = 0
    for level in reversed(range(levels)):
        for j in range(layout.layers_per_block + 1):  # the output ResBlocks take skip-concatenated input
            names |= {f"output_blocks_{o}_0_{r}" for r in (*res, "skip_connection")}
            if layout.attention[level]:
                names |= {f"output_blocks_{o}_1_{a}" for a in attn(layout.depths[level])}
            if j == layout.layers_per_block and level > 0:
                names.add(f"output_blocks_{o}_{2 if layout.attention[level] else 1}_conv")
            o += 1
    return {"diffusion_model_" + n for n in names}


@functools.lru_cache(maxsize=None)
def sd_unet_modules(sdxl: bool = False) -> dict[str, tuple[int, ...]]:
    """diffusers' SD 1.5 (or SDXL 1.0) UNet Linear/Conv2d module names -> weight shapes (built on
    the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL_UNET_CONFIG if sdxl else SD15_UNET_CONFIG))
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


def sgm_lora_name(diffusers_path: str) -> str:
    """The kohya name of an SDXL UNet module given by its diffusers path, in SGM naming as kohya's
    sd-scripts writes SDXL files: `down_blocks.1.attentions.0.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    name = _kohya("lora_unet_", diffusers_path)
    ldm = a1111_module_name(name, layout=SDXL_LAYOUT)
    if ldm == name:
        raise ValueError(f"{diffusers_path}: not a module of the SDXL UNet")
    return ldm.replace("diffusion_model_", "lora_unet_", 1)


def base_for(cross_attention_dim: int, prediction_type: str = "epsilon", layout: UNetLayout | None = None
             ) -> str | None:
    """The BASES key for a UNet's `cross_attention_dim` and its scheduler's `prediction_type` (and,
    for SDXL, its layout: one with SDXL 1.0's blocks is "sdxl" whatever its widths), or None."""
    if layout is not None and layout.label_emb:
        return "sdxl" if layout == SDXL_LAYOUT else None
    if cross_attention_dim == 1024:
        return "sd_v2_v" if prediction_type in ("v_prediction", "v") else "sd_v2"
    return "sd_v1" if cross_attention_dim == 768 else None


def infer_base(cross_attention_dims: Iterable[int]) -> str | None:
    """sd_v1 or sd_v2 from the context width the LoRA's attn2.to_k/to_v (or text encoder) reads."""
    dims = set(cross_attention_dims)
    found = {name for name, b in BASES.items() if b.cross_attention_dim in dims and name != "sd_v2_v"}
    return found.pop() if len(found) == 1 and len(dims) == 1 else None


@functools.lru_cache(maxsize=None)
def ldm_to_diffusers_names(sdxl: bool = False) -> dict[str, str]:
    """LoRA names after the LDM/SGM UNet (older SD files, every SDXL file:
    `lora_unet_input_blocks_1_1_...`) -> diffusers names, for SD 1.x/2.x's or SDXL's UNet."""
    table = {}
    layout = SDXL_LAYOUT if sdxl else SD1_LAYOUT
    for path in sd_unet_modules(sdxl):
        name = _kohya("lora_unet_", path)
        ldm = a1111_module_name(name, layout=layout)
        if ldm != name:
            table[ldm.replace("diffusion_model_", "lora_unet_", 1)] = name
    return table

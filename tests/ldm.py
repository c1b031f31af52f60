"""Write a diffusers folder's weights as one single-file checkpoint, named as the CompVis/SGM code
(and so the WebUIs) names them: the inverse of diffusers' `from_single_file` conversion, for the
tests' tiny models (our own rules; the tests check diffusers reads the file back to equal weights)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_name(key: str, config) -> str:
    """An LDM UNet tensor name (after `model.diffusion_model.`) for a diffusers UNet key."""
    module, part = key.rsplit(".", 1)
    n = config["layers_per_block"] + 1
    levels = len(config["down_block_types"])
    attention = ["CrossAttn" in t for t in config["down_block_types"]]

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET[head] + (f".{tail}" if tail else "")

    rules = (
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j, r: f"input_blocks.{1 + n * i + j}.0.{resnet(r)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j, r: f"input_blocks.{1 + n * i + j}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv()()", lambda i, *_: f"input_blocks.{n * (i + 1)}.0.op"),
        (r"mid_block\.resnets\.(\d+)()\.(.+)", lambda j, _, r: f"middle_block.{2 * j}.{resnet(r)}"),
        (r"mid_block\.attentions\.0()()\.(.+)", lambda _, __, r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j, r: f"output_blocks.{n * i + j}.0.{resnet(r)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j, r: f"output_blocks.{n * i + j}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv()()", lambda i, *_:
            f"output_blocks.{n * i + n - 1}.{2 if attention[levels - 1 - i] else 1}.conv"),
    )
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{part}"
    for pattern, rename in rules:
        if m := re.fullmatch(pattern, module):
            return f"{rename(*(int(g) if g.isdigit() else g for g in m.groups()))}.{part}"
    raise KeyError(key)


def vae_name(key: str, levels: int) -> str:
    """An LDM VAE tensor name (after `first_stage_model.`) for a diffusers AutoencoderKL key."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key):
        inner = f"block.{m[3]}" if m[2] == "resnets" else "downsample"
        return f"encoder.down.{m[1]}.{inner}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key):
        inner = f"block.{m[3]}" if m[2] == "resnets" else "upsample"
        return f"decoder.up.{levels - 1 - int(m[1])}.{inner}.{m[4]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def openclip_tensors(state: dict, prefix: str) -> dict:
    """A Hugging Face CLIP text encoder's tensors in OpenCLIP naming (q/k/v fused into in_proj)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    layers = {int(k.split(".")[2]) for k in state}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([state.pop(src + f"self_attn.{p}_proj.{part}")
                                                           for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{part}"] = state.pop(src + f"{a}.{part}")
    assert not state, f"unconverted text encoder tensors: {sorted(state)}"
    return {prefix + k: v for k, v in out.items()}


def clip_tensors(state: dict, prefix: str) -> dict:
    """A Hugging Face CLIP text encoder's tensors under `prefix`, with the `text_model.` root."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def write_single_file(folder: Path, path: Path, text_encoder: str = "clip") -> Path:
    """`folder`'s weights as one .safetensors. `text_encoder`: "clip" (SD 1.x), "openclip" (SD 2.x)
    or "sdxl" (CLIP then OpenCLIP under `conditioner.embedders.`)."""
    import safetensors.torch

    def weights(sub: str) -> dict:
        return safetensors.torch.load_file(next((folder / sub).glob("*.safetensors")))

    import json
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    out = {f"model.diffusion_model.{unet_name(k, unet_config)}": v for k, v in weights("unet").items()}
    for k, v in weights("vae").items():
        name = vae_name(k, vae_levels)
        out[f"first_stage_model.{name}"] = v[..., None, None] if ".mid.attn_1." in name and v.ndim == 2 else v
    if text_encoder == "clip":
        out |= clip_tensors(weights("text_encoder"), "cond_stage_model.transformer.")
    elif text_encoder == "openclip":
        out |= openclip_tensors(weights("text_encoder"), "cond_stage_model.model.")
    else:
        out |= clip_tensors(weights("text_encoder"), "conditioner.embedders.0.transformer.")
        out |= openclip_tensors(weights("text_encoder_2"), "conditioner.embedders.1.model.")
    safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path

"""A user's LoRA file, read: found in a folder, opened without unpickling, its format told apart,
its diffusers adapter config parsed, its modules built (webui/convert.py). Every reader of a user's
file (`import`, `inspect`, `generate --lora`, `--network_weights`) goes through `read_modules`, so
each refusal (pickle, truncated, no LoRA keys, odd parts) is one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from dreambooth_offset.errors import UsageError
from dreambooth_offset.safe_read import PICKLE_SUFFIXES, read_safetensors
from dreambooth_offset.training.lora import LORA_WEIGHT_NAME
from dreambooth_offset.webui.convert import COMPONENTS, KOHYA_PREFIXES, Modules, modules_from_diffusers, modules_from_kohya


def resolve(source: str | Path) -> Path:
    """The LoRA file itself, or the one in a folder (diffusers' file name first)."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        if len(found) == 1:
            return found[0]
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (only pickle files: {', '.join(pickled)}; they are never unpickled here)" if pickled else ""
        raise UsageError(f"{path}: no single LoRA .safetensors file in this folder{hint}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return path


def read_lora_file(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; pickle files are refused unopened."""
    def read(f):
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})

    return read_safetensors(resolve(source), read)


def detect_format(tensors: Mapping[str, torch.Tensor], source) -> str:
    """'kohya' (lora_unet_/lora_te_/lora_te1_/lora_te2_ keys) or 'diffusers' (unet./text_encoder./
    text_encoder_2. keys)."""
    if not tensors:
        raise UsageError(f"{source}: the file holds no tensors")
    prefixes = tuple(c + "." for c in COMPONENTS)
    if all(k.startswith(KOHYA_PREFIXES) for k in tensors):
        return "kohya"
    if all(k.startswith(prefixes) for k in tensors):
        return "diffusers"
    odd = next(k for k in tensors if not k.startswith(KOHYA_PREFIXES + prefixes))
    raise UsageError(f"{source}: unknown key {odd!r}; expected a diffusers LoRA (unet./text_encoder. keys) "
                     "or a WebUI one (lora_unet_/lora_te_ keys)")


def adapter_metadata(header: Mapping[str, str]) -> dict | None:
    """The LoraConfig dicts diffusers' save_lora_weights stores ("unet.lora_alpha": 8, ...)."""
    raw = header.get("lora_adapter_metadata")
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise UsageError("the file's lora_adapter_metadata is not JSON") from None


def read_modules(source: str | Path) -> tuple[str, Modules, dict[str, str]]:
    """(format, modules, metadata) of a LoRA file in either format: every reader of a user's file
    goes through here, so each refusal (pickle, truncated, no LoRA keys, odd parts) is one line."""
    tensors, header = read_lora_file(source)
    fmt = detect_format(tensors, source)
    if fmt == "kohya":
        return fmt, modules_from_kohya(tensors, source), header
    metadata = {k: v for k, v in header.items() if k != "lora_adapter_metadata"}
    return fmt, modules_from_diffusers(tensors, adapter_metadata(header), None, source), metadata

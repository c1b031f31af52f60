"""WebUI LoRA files: the kohya `ss_*` / SAI `modelspec.*` metadata, the `sshs_model_hash`, and
the atomic writer.

The trainer calls two functions (plain values, no config classes):

    metadata = training_metadata(base="sd_v1", rank=4, lora_alpha=8, output_name="sks_dog",
                                 started_at=time.time(), steps=800, learning_rate=1e-4,
                                 optimizer="AdamW", seed=0, resolution=512, mixed_precision="fp16",
                                 settings={"noise_offset": 0.1}, saved_at=time.time())
    sshs = save_webui_lora(out / "sks_dog.safetensors", unet_state, text_encoder_state,
                           lora_alpha=8, rank=4, metadata=metadata)

`unet_state` / `text_encoder_state` are the adapters' weights as `get_peft_model_state_dict`
returns them (`training.lora.lora_state_dicts`), or in diffusers' older `lora.down` /
`lora_linear_layer` naming; `text_encoder_state` may be None. The WebUI alpha written per module
is `scale * rank`, where `scale = lora_alpha / rank` is peft's, so every WebUI computes the update
the training used.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Mapping

from dreambooth_offset.errors import UsageError
from dreambooth_offset.webui import convert
from dreambooth_offset.webui.keys import BASES


def _text(value: object) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def training_metadata(
    *, base: str, rank: int, lora_alpha: float, output_name: str,
    started_at: float | None = None, saved_at: float | None = None, steps: int | None = None,
    learning_rate: float | None = None, optimizer: str | None = None, seed: int | None = None,
    resolution: int | tuple[int, int] | None = None, mixed_precision: str | None = None,
    settings: Mapping[str, object] | None = None, base_model_name: str | None = None,
) -> dict[str, str]:
    """The kohya `ss_*` and SAI `modelspec.*` strings for a WebUI LoRA file.

    base: "sd_v1", "sd_v2", "sd_v2_v" or "sdxl"; times are Unix seconds; settings: every noise, loss and
    optimizer setting of the run by name (written as `ss_<name>`, as kohya writes `ss_noise_offset`).
    Pure: no clock.
    """
    if base not in BASES:
        raise UsageError(f"base {base!r}: expected one of {', '.join(BASES)}")
    spec = BASES[base]
    if resolution is None:
        resolution = spec.resolution
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    meta = {
        "ss_base_model_version": spec.version,
        "ss_v2": str(spec.v2),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(lora_alpha)),
        "ss_output_name": output_name,
        "ss_resolution": str((width, height)),  # kohya writes the tuple's repr
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec.architecture}/lora",
        # kohya's values: SD 1.x/2.x LoRA are "diffusers", SDXL ones Stability's generative-models
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if base == "sdxl"
        else "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": spec.prediction_type,
    }
    optional = {
        "ss_training_started_at": started_at, "ss_training_finished_at": saved_at, "ss_steps": steps,
        "ss_learning_rate": learning_rate, "ss_optimizer": optimizer, "ss_seed": seed,
        "ss_mixed_precision": mixed_precision, "ss_sd_model_name": base_model_name,
    }
    meta.update({k: _text(v) for k, v in optional.items() if v is not None})
    for name, value in (settings or {}).items():
        meta[name if name.startswith("ss_") else f"ss_{name}"] = _text(value)
    when = saved_at if saved_at is not None else started_at
    if when is not None:
        meta["modelspec.date"] = datetime.datetime.fromtimestamp(int(when), datetime.timezone.utc).isoformat()
    return meta


def sshs_hash(stream: BinaryIO) -> str:
    """A1111's / kohya's `sshs_model_hash`: sha256 of a safetensors file after its header.

    The header (8-byte little-endian length, then JSON) holds the metadata, so the hash names the
    weights alone and can be stored in the header it skips.
    """
    header_len = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_len)
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def file_sshs_hash(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sshs_hash(f)


def write_webui_file(path: str | Path, tensors: dict, metadata: Mapping[str, str]) -> str:
    """Write a WebUI LoRA file with `sshs_model_hash` added to its metadata; returns that hash.

    Written to a temporary file and renamed, so a crash never leaves a half-written LoRA.
    """
    import safetensors.torch

    path = Path(path)
    sshs = sshs_hash(io.BytesIO(safetensors.torch.save(tensors)))  # tensor bytes do not depend on the header
    metadata = {**metadata, "sshs_model_hash": sshs}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sshs


def save_webui_lora(path: str | Path, unet_lora_state_dict: Mapping, text_encoder_lora_state_dict: Mapping | None = None,
                    text_encoder_2_lora_state_dict: Mapping | None = None, *, lora_alpha: float, rank: int,
                    metadata: Mapping[str, str], dtype=None, base: str = "sd_v1") -> str:
    """Write the trained adapters as a kohya-format WebUI LoRA for `base`; returns its `sshs_model_hash`."""
    config = {"r": rank, "lora_alpha": lora_alpha}
    modules = {}
    for component, state in zip(convert.COMPONENTS, (unet_lora_state_dict, text_encoder_lora_state_dict,
                                                     text_encoder_2_lora_state_dict)):
        if state:
            modules.update(convert.modules_from_peft(state, component, config))
    return write_webui_file(path, convert.modules_to_kohya(modules, dtype, base), metadata)



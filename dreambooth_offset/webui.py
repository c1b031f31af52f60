"""LoRA files for AUTOMATIC1111, Forge and ComfyUI: kohya-format export and import, with metadata.

The trainer calls two functions (plain values, no config classes):

    base = base_for(unet.config.cross_attention_dim, scheduler.config.prediction_type)
    # base is None for a UNet unlike SD 1.x/2.x (the tiny test model): skip the WebUI file then.
    metadata = training_metadata(base=base, rank=4, lora_alpha=8, output_name="sks_dog",
                                 started_at=time.time(), steps=800, learning_rate=1e-4,
                                 optimizer="AdamW", seed=0, resolution=512, mixed_precision="fp16",
                                 noise={"noise_offset": 0.1}, saved_at=time.time())
    sshs = save_webui_lora(out / "sks_dog.safetensors", unet_state, text_encoder_state,
                           lora_alpha=8, rank=4, metadata=metadata)

`unet_state` / `text_encoder_state` are the adapters' weights as `get_peft_model_state_dict`
returns them (`lora.lora_state_dicts`), or in diffusers' older `lora.down` / `lora_linear_layer`
naming; `text_encoder_state` may be None. The WebUI alpha written per module is `scale * rank`, where
`scale = lora_alpha / rank` is peft's, so every WebUI computes the update the training used.

Commands: `export` (diffusers LoRA -> WebUI file), `import` (WebUI file -> diffusers folder),
`inspect`. Pickled files (.ckpt/.bin/.pt) are refused, never unpickled.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Mapping

from dreambooth_offset import webui_convert as convert
from dreambooth_offset.errors import UsageError
from dreambooth_offset.webui_keys import BASES, a1111_sd_version, base_for, key_map_report  # noqa: F401 (base_for: API)

SIDECAR = "webui_metadata.json"  # the WebUI file's metadata, kept by `import` for a later `export`


def _text(value: object) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def training_metadata(
    *, base: str, rank: int, lora_alpha: float, output_name: str,
    started_at: float | None = None, saved_at: float | None = None, steps: int | None = None,
    learning_rate: float | None = None, optimizer: str | None = None, seed: int | None = None,
    resolution: int | tuple[int, int] | None = None, mixed_precision: str | None = None,
    noise: Mapping[str, object] | None = None, base_model_name: str | None = None,
) -> dict[str, str]:
    """The kohya `ss_*` and SAI `modelspec.*` strings for a WebUI LoRA file.

    base: "sd_v1", "sd_v2" or "sd_v2_v"; times are Unix seconds; noise: every noise setting of
    the run by name (written as `ss_<name>`, as kohya writes `ss_noise_offset`). Pure: no clock.
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
        "modelspec.implementation": "diffusers",  # kohya's value for SD 1.x/2.x LoRA
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
    for name, value in (noise or {}).items():
        meta[name if name.startswith("ss_") else f"ss_{name}"] = _text(value)
    when = saved_at if saved_at is not None else started_at
    if when is not None:
        meta["modelspec.date"] = datetime.datetime.fromtimestamp(int(when), datetime.timezone.utc).isoformat()
    return meta


def sshs_hash(file_bytes: bytes) -> str:
    """A1111's / kohya's `sshs_model_hash`: sha256 of a safetensors file after its header.

    The header (8-byte little-endian length, then JSON) holds the metadata, so the hash names the
    weights alone and can be stored in the header it skips.
    """
    header_len = int.from_bytes(file_bytes[:8], "little")
    return hashlib.sha256(file_bytes[8 + header_len:]).hexdigest()


def file_sshs_hash(path: str | Path) -> str:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_webui_file(path: str | Path, tensors: dict, metadata: Mapping[str, str]) -> str:
    """Write a WebUI LoRA file with `sshs_model_hash` added to its metadata; returns that hash.

    Written to a temporary file and renamed, so a crash never leaves a half-written LoRA.
    """
    import safetensors.torch

    path = Path(path)
    sshs = sshs_hash(safetensors.torch.save(tensors))  # tensor bytes do not depend on the header
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
                    *, lora_alpha: float, rank: int, metadata: Mapping[str, str], dtype=None) -> str:
    """Write the trained adapters as a kohya-format WebUI LoRA; returns its `sshs_model_hash`."""
    config = {"r": rank, "lora_alpha": lora_alpha}
    modules = convert.modules_from_peft(unet_lora_state_dict, "unet", config)
    if text_encoder_lora_state_dict:
        modules.update(convert.modules_from_peft(text_encoder_lora_state_dict, "text_encoder", config))
    return write_webui_file(path, convert.modules_to_kohya(modules, dtype), metadata)


def _summary(modules: convert.Modules) -> tuple[int, float]:
    """The most common rank and WebUI alpha: kohya's ss_network_dim / ss_network_alpha."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values() if m.rank == rank).most_common(1)[0][0]
    return rank, alpha


def _base(args_base: str | None, metadata: Mapping[str, str], modules: convert.Modules) -> str | None:
    if args_base:
        return args_base
    version = metadata.get("ss_base_model_version")
    if version in BASES:
        return version
    return convert.infer_base(modules)


def _counts(modules: convert.Modules) -> str:
    per = Counter(key.split(".", 1)[0] for key in modules)
    return ", ".join(f"{n} {c}" for c, n in per.items())


def _print_key_maps(keys, base: str | None) -> None:
    if base is None:
        print("  WebUI key maps: base unknown (pass --base) so not checked")
        return
    for loader, (matched, unmatched) in key_map_report(keys, base).items():
        note = f"; first unmatched: {unmatched[0]}" if unmatched else ""
        print(f"  {loader}: {matched}/{matched + len(unmatched)} keys match the {base} model{note}")


def _read_sidecar(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        kept = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not JSON ({err})") from None
    return {str(k): str(v) for k, v in kept.items()}


def run_export(args) -> int:
    tensors, header = convert.read_lora_file(args.source)
    if convert.detect_format(tensors, args.source) != "diffusers":
        raise UsageError(f"{args.source}: already a WebUI (kohya) LoRA; see `dreambooth-offset inspect`")
    adapter_meta = convert.adapter_metadata(header)
    if not adapter_meta and args.lora_alpha is None:
        print(f"warning: {args.source} does not say its lora_alpha; assuming alpha = rank (scale 1). "
              "Pass --lora_alpha if training used another value.", file=sys.stderr)
    modules = convert.modules_from_diffusers(tensors, adapter_meta, args.lora_alpha, args.source)
    kept = _read_sidecar(convert.resolve(args.source).parent / SIDECAR)
    base = _base(args.base, kept, modules)
    if base is None:
        raise UsageError(f"{args.source}: cannot tell the base model from the LoRA's shapes; "
                         f"pass --base ({', '.join(BASES)})")
    rank, alpha = _summary(modules)
    out = Path(args.output)
    metadata = {**kept, **training_metadata(base=base, rank=rank, lora_alpha=alpha,
                                            output_name=args.output_name or out.stem)}
    kohya = convert.modules_to_kohya(modules, convert.DTYPES[args.dtype])
    sshs = write_webui_file(out, kohya, metadata)
    print(f"wrote {out}: {len(modules)} modules ({_counts(modules)}), rank {rank}, alpha {alpha:g}, "
          f"base {base}, sshs_model_hash {sshs[:12]}")
    _print_key_maps(kohya, base)
    return 0


def run_import(args) -> int:
    tensors, metadata = convert.read_lora_file(args.source)
    if convert.detect_format(tensors, args.source) != "kohya":
        raise UsageError(f"{args.source}: not a WebUI (kohya) LoRA; diffusers files load as they are")
    modules = convert.modules_from_kohya(tensors, args.source)
    target = convert.save_diffusers_lora(args.output, modules)
    base = _base(args.base, metadata, modules)
    kept = {**metadata, **({"ss_base_model_version": base} if base else {})}
    (Path(args.output) / SIDECAR).write_text(json.dumps(kept, indent=2, sort_keys=True))
    rank, alpha = _summary(modules)
    print(f"wrote {target}: {len(modules)} modules ({_counts(modules)}), rank {rank}, alpha {alpha:g}, "
          f"base {base or 'unknown'}; the file's metadata is kept in {SIDECAR}")
    return 0


def run_inspect(args) -> int:
    tensors, header = convert.read_lora_file(args.source)
    fmt = convert.detect_format(tensors, args.source)
    if fmt == "kohya":
        modules, metadata = convert.modules_from_kohya(tensors, args.source), header
    else:
        modules = convert.modules_from_diffusers(tensors, convert.adapter_metadata(header), None, args.source)
        metadata = {k: v for k, v in header.items() if k != "lora_adapter_metadata"}
    base = _base(args.base, metadata, modules)
    rank, alpha = _summary(modules)
    print(f"{args.source}\n  format: {fmt}\n  base: {base or 'unknown'} (A1111 files it under "
          f"{a1111_sd_version(metadata)})\n  modules: {len(modules)} ({_counts(modules)}), "
          f"rank {rank}, alpha {alpha:g} (scale {alpha / rank:g})")
    if fmt == "kohya":
        _print_key_maps(tensors, base)
        print(f"  diffusers load_lora_weights: {convert.diffusers_accepts(tensors)}")
        if "sshs_model_hash" in metadata:
            ok = metadata["sshs_model_hash"] == file_sshs_hash(convert.resolve(args.source))
            verdict = "matches the weights" if ok else "DOES NOT match the weights"
            print(f"  sshs_model_hash: {metadata['sshs_model_hash'][:12]} ({verdict})")
    else:
        print("  WebUIs: need the kohya format; run `dreambooth-offset export`")
    noise_first = sorted(metadata, key=lambda k: ("noise" not in k and "snr" not in k, k))
    print("  metadata:" if metadata else "  metadata: none")
    for key in noise_first:
        print(f"    {key}: {metadata[key]}")
    return 0


def register(subparsers) -> None:
    bases = ", ".join(BASES)
    p = subparsers.add_parser("export", help="Write a diffusers LoRA as a WebUI (kohya) LoRA file.",
                              description="diffusers/peft LoRA -> kohya-format .safetensors for A1111, Forge, ComfyUI.")
    p.add_argument("source", help="pytorch_lora_weights.safetensors, or the folder holding it")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument("--base", choices=tuple(BASES), help=f"base model ({bases}); inferred from shapes when possible")
    p.add_argument("--lora_alpha", type=float,
                   help="alpha used in training; overrides the file's record (needed when it has none)")
    p.add_argument("--dtype", choices=tuple(convert.DTYPES), default="same", help="tensor dtype in the output")
    p.add_argument("--output_name", help="name recorded in the metadata (default: the file name)")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("import", help="Convert a WebUI (kohya) LoRA file to a diffusers LoRA folder.",
                              description="kohya-format .safetensors -> pytorch_lora_weights.safetensors.")
    p.add_argument("source", help="a kohya-format .safetensors LoRA")
    p.add_argument("-o", "--output", required=True, help="folder to write pytorch_lora_weights.safetensors into")
    p.add_argument("--base", choices=tuple(BASES), help=f"base model ({bases}) when the file does not say")
    p.set_defaults(func=run_import)

    p = subparsers.add_parser("inspect", help="Show a LoRA file's format, base, rank/alpha, metadata, loader matches.")
    p.add_argument("source", help="a LoRA .safetensors file or a folder holding one")
    p.add_argument("--base", choices=tuple(BASES), help=f"base model ({bases}) to check the key maps against")
    p.set_defaults(func=run_inspect)

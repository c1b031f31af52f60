"""`export` (diffusers LoRA -> WebUI file), `import` (WebUI file -> diffusers folder) and `inspect`.

Pickled files (.ckpt/.bin/.pt) are refused, never unpickled. The flags are the schemas
ExportConfig, ImportConfig and InspectConfig (config/commands.py).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping

from dreambooth_offset.config import add_arguments, given_values, load_config
from dreambooth_offset.config.run import CONFIG_NAME
from dreambooth_offset.config.commands import ExportConfig, ImportConfig, InspectConfig
from dreambooth_offset.data.summary import read_record
from dreambooth_offset.errors import UsageError
from dreambooth_offset.webui import convert, lora_file
from dreambooth_offset.webui.keys import BASES
from dreambooth_offset.webui.loaders import a1111_sd_version, key_map_report
from dreambooth_offset.webui.metadata import file_sshs_hash, training_metadata, write_webui_file

SIDECAR = "webui_metadata.json"  # the WebUI file's metadata, kept by `import` for a later `export`


def _summary(modules: convert.Modules) -> tuple[int, float]:
    """The most common rank and WebUI alpha: kohya's ss_network_dim / ss_network_alpha."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values() if m.rank == rank).most_common(1)[0][0]
    return rank, alpha


def _base(args_base: str | None, metadata: Mapping[str, str], modules: convert.Modules) -> str | None:
    if args_base:
        return args_base
    by_version = {b.version: name for name, b in BASES.items()}  # sdxl_base_v1-0 -> sdxl; SD's are the same
    version = metadata.get("ss_base_model_version")
    if version in by_version:
        return by_version[version]
    return convert.infer_base(modules)


def _known_base(given: str | None, metadata: Mapping[str, str], modules: convert.Modules, source) -> str:
    """The base the LoRA is for: the flag, the metadata, or its shapes. Without a loaded model only
    the WebUIs' key maps are checked (and printed); `generate`, which loads the base, refuses a LoRA
    whose modules do not fit it."""
    base = _base(given, metadata, modules)
    if base is None:
        raise UsageError(f"{source}: cannot tell the base model from the LoRA's shapes; "
                         f"pass --base ({', '.join(BASES)})")
    return base


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


def _training_run(folder: Path):
    """The resolved config of the run that wrote a diffusers LoRA (training_config.json beside it), or None."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return load_config(None, json.loads(path.read_text()))
    except (json.JSONDecodeError, UsageError) as err:
        raise UsageError(f"{path}: not a training config this version reads ({err})") from None


def _auto_record(folder: Path) -> dict[str, object]:
    """`noise_offset_auto` as training recorded it (noise_offset_auto.json), or nothing."""
    from dreambooth_offset.noise.auto import AutoOffset, metadata
    from dreambooth_offset.training.auto_offset import RECORD_NAME

    path = folder / RECORD_NAME
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return metadata(AutoOffset(**{k: record[k] for k in AutoOffset._fields}))


def run_export(cfg) -> int:
    source = cfg.file.source
    tensors, header = lora_file.read_lora_file(source)
    if lora_file.detect_format(tensors, source) != "diffusers":
        raise UsageError(f"{source}: already a WebUI (kohya) LoRA; see `dreambooth-offset inspect`")
    adapter_meta = lora_file.adapter_metadata(header)
    if not adapter_meta and cfg.adapter.lora_alpha is None:
        print(f"warning: {source} does not say its lora_alpha; assuming alpha = rank (scale 1). "
              "Pass --lora_alpha if training used another value.", file=sys.stderr)
    modules = convert.modules_from_diffusers(tensors, adapter_meta, cfg.adapter.lora_alpha, source)
    beside = lora_file.resolve(source).parent
    kept, run = _read_sidecar(beside / SIDECAR), _training_run(beside)
    base = _known_base(cfg.file.base, kept, modules, source)
    if base == "sd_v2" and not cfg.file.base and run is not None and run.loss.prediction_type == "v_prediction":
        base = "sd_v2_v"  # the shapes cannot tell 2.x-v from 2.x; the run's prediction type can
    rank, alpha = _summary(modules)
    out = Path(cfg.file.output)
    name = cfg.train.output_name or out.stem
    if run is None:
        metadata = training_metadata(base=base, rank=rank, lora_alpha=alpha, output_name=name)
    else:
        from dreambooth_offset.training.outputs import run_metadata

        prediction = run.loss.prediction_type or ("v_prediction" if BASES[base].prediction_type == "v" else "epsilon")
        metadata = run_metadata(run, base=base, rank=rank, lora_alpha=alpha, prediction_type=prediction,
                                output_name=name, auto=_auto_record(beside), dataset=read_record(beside))
        print(f"read {beside / CONFIG_NAME}: resolution, noise, loss and dataset settings as training wrote them")
    metadata = {**kept, **metadata}
    kohya = convert.modules_to_kohya(modules, convert.DTYPES[cfg.export.dtype], base)
    sshs = write_webui_file(out, kohya, metadata)
    print(f"wrote {out}: {len(modules)} modules ({_counts(modules)}), rank {rank}, alpha {alpha:g}, "
          f"base {base}, sshs_model_hash {sshs[:12]}")
    _print_key_maps(kohya, base)
    return 0


def run_import(cfg) -> int:
    source, output = cfg.file.source, cfg.file.output
    fmt, modules, metadata = lora_file.read_modules(source)
    if fmt != "kohya":
        raise UsageError(f"{source}: not a WebUI (kohya) LoRA; diffusers files load as they are")
    base = _base(cfg.file.base, metadata, modules)
    target = convert.save_diffusers_lora(output, modules)
    kept = {**metadata, **({"ss_base_model_version": BASES[base].version} if base else {})}
    (Path(output) / SIDECAR).write_text(json.dumps(kept, indent=2, sort_keys=True))
    rank, alpha = _summary(modules)
    print(f"wrote {target}: {len(modules)} modules ({_counts(modules)}), rank {rank}, alpha {alpha:g}, "
          f"base {base or 'unknown'}; the file's metadata is kept in {SIDECAR}")
    return 0


def run_inspect(cfg) -> int:
    source = cfg.file.source
    fmt, modules, metadata = lora_file.read_modules(source)
    base = _base(cfg.file.base, metadata, modules)
    rank, alpha = _summary(modules)
    print(f"{source}\n  format: {fmt}\n  base: {base or 'unknown'} (A1111 files it under "
          f"{a1111_sd_version(metadata)})\n  modules: {len(modules)} ({_counts(modules)}), "
          f"rank {rank}, alpha {alpha:g} (scale {alpha / rank:g})")
    if fmt == "kohya":
        tensors, _ = lora_file.read_lora_file(source)
        _print_key_maps(tensors, base)
        print(f"  diffusers load_lora_weights: {convert.diffusers_accepts(tensors)}")
        if "sshs_model_hash" in metadata:
            ok = metadata["sshs_model_hash"] == file_sshs_hash(lora_file.resolve(source))
            verdict = "matches the weights" if ok else "DOES NOT match the weights"
            print(f"  sshs_model_hash: {metadata['sshs_model_hash'][:12]} ({verdict})")
    else:
        print("  WebUIs: need the kohya format; run `dreambooth-offset export`")
    noise_first = sorted(metadata, key=lambda k: ("noise" not in k and "snr" not in k, k))
    print("  metadata:" if metadata else "  metadata: none")
    for key in noise_first:
        print(f"    {key}: {metadata[key]}")
    return 0


COMMANDS = (
    ("export", ExportConfig, run_export, "Write a diffusers LoRA as a WebUI (kohya) LoRA file.",
     "diffusers/peft LoRA -> kohya-format .safetensors for A1111, Forge, ComfyUI."),
    ("import", ImportConfig, run_import, "Convert a WebUI (kohya) LoRA file to a diffusers LoRA folder.",
     "kohya-format .safetensors -> pytorch_lora_weights.safetensors."),
    ("inspect", InspectConfig, run_inspect, "Show a LoRA file's format, base, rank/alpha, metadata, loader matches.",
     "Format, base, rank and alpha, metadata, and whether the WebUIs' and diffusers' loaders take every key."),
)


def register(subparsers) -> None:
    for name, schema, run, summary, description in COMMANDS:
        p = subparsers.add_parser(name, help=summary, description=description, allow_abbrev=False)
        add_arguments(p, schema, config_file=False)
        p.set_defaults(func=lambda args, schema=schema, run=run: run(load_config(None, given_values(args, schema), schema)))

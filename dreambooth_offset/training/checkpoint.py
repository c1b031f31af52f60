"""Resumable checkpoints: accelerate's state, the LoRA weights only, the step and the generator.

A checkpoint is written into `checkpoint-N.tmp` and renamed to `checkpoint-N` once complete, so
a crash mid-save never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from dreambooth_offset.config.run import CONFIG_NAME, RESUME_MAY_CHANGE, RunConfig, resume_differences
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.lora import LORA_WEIGHT_NAME, adapter_file, load_adapter_file

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """`latest` -> newest finished checkpoint (None if there is none); a path -> that folder."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(value)
        if not path.is_dir() and (Path(output_dir) / value).is_dir():
            path = Path(output_dir) / value
        if not (path / _state_file(0)).is_file():
            raise UsageError(f"--resume_from_checkpoint {value}: not a checkpoint folder of this trainer")
    check_complete(path)
    return path


def check_complete(path: Path) -> None:
    """Refuse a checkpoint with a missing, empty or truncated file, naming it."""
    from safetensors import SafetensorError

    for name in (_state_file(0), adapter_file(path).name, "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            raise UsageError(f"--resume_from_checkpoint {path}: {name} is missing or empty; resume from another "
                             "checkpoint-N")
        if name.endswith(".safetensors"):
            try:
                load_file(file)
            except (SafetensorError, OSError) as err:
                raise UsageError(f"--resume_from_checkpoint {path}: {name} is damaged or truncated ({err}); resume "
                                 "from another checkpoint-N") from None


def check_resumable(checkpoint: Path, cfg: RunConfig) -> None:
    """Refuse a resume whose configuration differs from the checkpoint's, naming each key (the
    checkpoint's own copy of the config, or its output folder's for checkpoints without one)."""
    saved_path = next((p for p in (checkpoint / CONFIG_NAME, checkpoint.parent / CONFIG_NAME) if p.is_file()), None)
    if saved_path is None:
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--resume_from_checkpoint {checkpoint}: cannot read {saved_path} ({err})") from None
    differences = resume_differences(saved, cfg)
    if differences:
        raise UsageError(f"--resume_from_checkpoint {checkpoint}: the configuration differs from the checkpoint's "
                         f"({'; '.join(differences)}). Resume with the checkpoint's settings (only "
                         f"{', '.join(RESUME_MAY_CHANGE[:3])}, ... may change; docs/usage.md), or train into a new "
                         "--output_dir")


def prune(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that `keep` remain."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path)


def _state_file(process_index: int) -> str:
    return f"trainer_state_{process_index}.safetensors"


def save_trainer_state(directory: Path, step: int, generator: torch.Generator, process_index: int) -> None:
    save_file({"step": torch.tensor(step), "generator": generator.get_state()}, directory / _state_file(process_index))


def load_trainer_state(directory: Path, generator: torch.Generator, process_index: int) -> int:
    """Restore the generator in place; return the step the checkpoint was taken at."""
    path = directory / _state_file(process_index)
    if not path.is_file():
        raise UsageError(f"{directory}: no state for process {process_index} (was it saved with fewer processes?)")
    state = load_file(path)
    generator.set_state(state["generator"])
    return int(state["step"])


def register_lora_hooks(accelerator, unet, text_encoder=None, text_encoder_2=None) -> None:
    """Make `accelerator.save_state/load_state` skip the models (the frozen base comes from the
    pretrained folder) and restore the LoRA from the checkpoint's LoRA file, which
    `save_checkpoint` writes in the same format as the final output."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    from dreambooth_offset.compat import set_text_encoder_lora

    def save_hook(models, weights, output_dir):
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()
        file = adapter_file(input_dir)
        if file.name != LORA_WEIGHT_NAME:  # LoHa / LoKr
            components = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
            return load_adapter_file(file, {c: m and accelerator.unwrap_model(m) for c, m in components.items()})
        state, _ = StableDiffusionPipeline.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
        unet_state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        set_peft_model_state_dict(accelerator.unwrap_model(unet), convert_unet_state_dict_to_peft(unet_state))
        for prefix, encoder in (("text_encoder.", text_encoder), ("text_encoder_2.", text_encoder_2)):
            if encoder is not None:
                set_text_encoder_lora(state, accelerator.unwrap_model(encoder), prefix)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


@contextmanager
def staged(accelerator, output_dir: str | Path, step: int, keep: int | None) -> Iterator[Path]:
    """The folder `checkpoint-N.tmp` for every process to write step N's checkpoint into; renamed
    to `checkpoint-N` once the block ends without an error, and only then are the oldest
    checkpoints deleted so that `keep` remain: a run killed mid-save still has its previous
    checkpoint, and `latest` never picks the unfinished one. A failed save removes its `.tmp`."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        yield tmp
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune(output_dir, keep)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, directory: Path, generator: torch.Generator) -> int:
    """Restore the LoRA, optimizer, schedule and RNG states; the step the checkpoint was taken at.
    accelerate reads its files with `torch.load(weights_only=True)`: no pickle runs code."""
    import pickle

    try:
        accelerator.load_state(str(directory))
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--resume_from_checkpoint {directory}: cannot load it ({first}); resume from another "
                         "checkpoint-N") from None
    return load_trainer_state(directory, generator, accelerator.process_index)

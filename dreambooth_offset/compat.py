"""Every private upstream API the package uses, in one place, each with the public API it waits for.

Each wrapper is a one-liner; when the public API lands (or the private one moves), only this file
changes.
"""
from __future__ import annotations


def reset_accelerator_state() -> None:
    """accelerate keeps its state (mixed precision ...) per process, so a second `train()` in the
    same process (the experiments, the tests) could not choose another precision. The process
    group (PartialState) stays. Waits for: a public reset in accelerate (none as of 1.15)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def set_text_encoder_lora(state: dict, text_encoder, prefix: str = "text_encoder.") -> None:
    """Load the `prefix`ed LoRA weights of a diffusers LoRA state dict (`text_encoder.`, SDXL's
    `text_encoder_2.`) into a peft text encoder. Waits for: `load_lora_adapter` on transformers
    models (diffusers has it for the UNet only as of 0.42)."""
    from diffusers.training_utils import _set_state_dict_into_text_encoder

    _set_state_dict_into_text_encoder(state, prefix=prefix, text_encoder=text_encoder)


def kohya_to_diffusers(state: dict) -> tuple[dict, dict]:
    """diffusers' own kohya/WebUI -> diffusers LoRA key converter (the one behind
    `load_lora_weights`): (converted state dict, network alphas). Waits for: a public export of
    `lora_conversion_utils` (private as of diffusers 0.42)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    return _convert_non_diffusers_lora_to_diffusers(state)

"""What differs between the model families: SD 1.x / 2.x (one CLIP text encoder, its last hidden
state as the context) and SDXL (two text encoders, the penultimate hidden states of both side by
side, the second's pooled projection and the image's size and crop as extra conditioning).

Everything else (the loop, noise, objective, checkpoints, LoRA) is the same code for both; the
family is read from the model folder (docs/sdxl.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

SD, SDXL = "sd", "sdxl"

# `--noise_offset` when unset (docs/sdxl.md, "Offset noise"). SD 1.x/2.x: Guttenberg's 0.1, the
# value of his post and of the black-image experiment. SDXL: its base was already trained with
# offset noise (Podell et al. 2023, SDXL report; its model card), so a fine-tune needs only a
# light one; 0.0357 is the value kohya's sd-scripts docs suggest for SDXL.
DEFAULT_NOISE_OFFSET = {SD: 0.1, SDXL: 0.0357}


def family_of(root: str | Path) -> str:
    """SDXL when the folder's `model_index.json` names an SDXL pipeline or it has `text_encoder_2/`."""
    root = Path(root)
    index = root / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    return SDXL if name.startswith("StableDiffusionXL") or (root / "text_encoder_2").is_dir() else SD


class Conditioning(NamedTuple):
    """The text side of the UNet's input, for a batch of prompts."""

    context: Tensor  # (B, L, D) cross-attention context
    pooled: Tensor | None = None  # (B, P) SDXL: text_encoder_2's pooled projection (`text_embeds`)

    def rows(self, index) -> "Conditioning":
        return Conditioning(*(None if t is None else t[index] for t in self))

    def to(self, device) -> "Conditioning":
        return Conditioning(*(None if t is None else t.to(device) for t in self))


def tokenize(tokenizers: Sequence, prompts: list[str]) -> Tensor:
    """Token ids padded to each tokenizer's window: (B, L) for one tokenizer, (B, 2, L) for SDXL's two."""
    ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in tokenizers]
    return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def encode_prompts(text_encoders: Sequence[torch.nn.Module], input_ids: Tensor) -> Conditioning:
    """One encoder: its last hidden state (SD 1.x / 2.x). Two (SDXL, as its pipeline encodes):
    both penultimate hidden states concatenated, and the last encoder's pooled projection."""
    if len(text_encoders) == 1:
        encoder = text_encoders[0]
        return Conditioning(encoder(input_ids.to(encoder.device))[0])
    states, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        out = encoder(input_ids[:, i].to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
    return Conditioning(torch.cat(states, dim=-1), pooled)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> Tensor:
    """SDXL's size conditioning: (original h, w, crop top, left, target h, w), as its pipeline builds it."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def predict(unet, noisy_latents: Tensor, timesteps: Tensor, cond: Conditioning, times: Tensor | None = None) -> Tensor:
    """The UNet's output; SDXL's also takes the pooled text embedding and the time ids."""
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": times.to(cond.pooled)}
    return unet(noisy_latents, timesteps, cond.context, added_cond_kwargs=added).sample

"""Whether a LoRA fits a loaded model: every module present, every pair of the weight's shape."""
from __future__ import annotations

from typing import Mapping

import torch

from dreambooth_offset.errors import UsageError
from dreambooth_offset.webui.convert import Modules
from dreambooth_offset.webui.keys import canonical_text_encoder_path


def module_shapes(**models) -> dict[str, tuple[int, ...]]:
    """Weight shapes of the Linear/Conv2d modules of loaded models, named as in Modules
    (`unet=...`, `text_encoder=...`; the text encoder's under `text_model.`); LoRA layers skipped."""
    shapes = {}
    for component, model in models.items():
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name:
                path = name.replace(".base_layer", "")
                path = canonical_text_encoder_path(path) if component.startswith("text_encoder") else path
                shapes[f"{component}.{path}"] = tuple(m.weight.shape)
    return shapes


def check_fits(modules: Modules, shapes: Mapping[str, tuple[int, ...]], source, base: str) -> None:
    """Refuse a LoRA with a module the base does not have, or whose up @ down does not have the
    base weight's (out, in) shape, naming the first such module."""
    for key, m in sorted(modules.items()):
        shape = shapes.get(key)
        if shape is None:
            raise UsageError(f"{source}: {key} is not a module of the {base} base; the LoRA was made for another "
                             "model")
        if (m.up.shape[0], m.down.shape[1]) != shape[:2] or (shape[2:] not in ((), (1, 1)) and m.down.ndim == 2):
            raise UsageError(f"{source}: {key} is ({m.up.shape[0]}, {m.down.shape[1]}) in the LoRA but "
                             f"{tuple(shape)} in the {base} base; the LoRA was made for another model")

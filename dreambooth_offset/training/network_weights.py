"""`--network_weights FILE`: start training from an existing LoRA (a diffusers or WebUI file)."""
from __future__ import annotations

import torch

from dreambooth_offset.config import AdapterConfig
from dreambooth_offset.errors import UsageError


def lora_modules(model: torch.nn.Module, component: str) -> dict[str, torch.nn.Module]:
    """A model's peft LoRA layers by the path the LoRA files use (text encoders under `text_model.`)."""
    from dreambooth_offset.webui.keys import canonical_text_encoder_path

    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            found[name if component == "unet" else canonical_text_encoder_path(name)] = module
    return found


def load_network_weights(source: str, cfg: AdapterConfig, models: dict[str, torch.nn.Module]) -> int:
    """Copy the LoRA of `source` into the run's fresh adapters (`models`: component -> model with
    LoRA added); returns the modules loaded. Each file module must meet a LoRA of this run with the
    same shapes, else the first one that does not is named; the file's alpha is kept by scaling its
    up matrix to this run's alpha / rank; a DoRA file's magnitudes go into a --use_dora run. Run
    modules the file lacks keep their initialisation."""
    from dreambooth_offset.webui.lora_file import read_modules

    _, modules, _ = read_modules(source)
    targets = {component: lora_modules(model, component) for component, model in models.items()}
    scale = cfg.alpha / cfg.rank
    for key, m in sorted(modules.items()):
        component, path = key.split(".", 1)
        layer = targets.get(component, {}).get(path)
        if layer is None:
            hint = ("--train_text_encoder" if component.startswith("text_encoder") and component not in targets
                    else "--unet_target_modules / --text_encoder_target_modules")
            raise UsageError(f"--network_weights {source}: module {key} has no LoRA in this run (check {hint}, "
                             "or the file is for another model)")
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if m.down.shape != a.shape or m.up.shape != b.shape:
            raise UsageError(f"--network_weights {source}: module {key} has shapes down {tuple(m.down.shape)} / "
                             f"up {tuple(m.up.shape)}, this run's LoRA {tuple(a.shape)} / {tuple(b.shape)} "
                             f"(--rank {cfg.rank}; or the file is for another model)")
        magnitude = layer.lora_magnitude_vector["default"].weight if "default" in layer.lora_magnitude_vector else None
        if (m.magnitude is None) != (magnitude is None):
            kinds = ("DoRA", "plain LoRA") if magnitude is None else ("plain LoRA", "DoRA")
            raise UsageError(f"--network_weights {source}: module {key} is {kinds[0]} in the file and {kinds[1]} in "
                             "this run (--use_dora)")
        with torch.no_grad():
            a.copy_(m.down)
            b.copy_(m.up * (m.alpha / m.rank) / scale)  # the same update at this run's alpha (and DoRA direction)
            if magnitude is not None:
                magnitude.copy_(m.magnitude.reshape(magnitude.shape))
    return len(modules)

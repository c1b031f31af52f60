"""LoHa and LoKr (peft's LoHaConfig / LoKrConfig) in LyCORIS's WebUI keys, which A1111, Forge
and ComfyUI load: `<module>.hada_w1_a` ... / `<module>.lokr_w1` ... and `<module>.alpha`, module
names as for LoRA (`convert.kohya_name`).

peft's tensors are LyCORIS's, same names and shapes (conv weights flattened to 2-D factors); what
the loaders compute from them (their published code, restated):
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, r = hada_w1_b's rows: peft's alpha / r.
- LoKr: dW = kron(w1, w2) * scale, each factor full or a product `_a @ _b`; scale = alpha / r when
  one factor is a product (r = its `_b`'s rows), but 1 when both are full, where peft still
  applies alpha / r. So for that case the writer multiplies alpha / r into `lokr_w1` and writes
  alpha = r, as LyCORIS itself does: every loader then computes peft's update.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch

from dreambooth_offset.webui.convert import COMPONENTS, kohya_name
from dreambooth_offset.webui.keys import canonical_text_encoder_path

PREFIXES = {"loha": "hada_", "lokr": "lokr_"}


def lycoris_tensors(states: Mapping[str, Mapping[str, torch.Tensor] | None], network_type: str, rank: int,
                    alpha: float, base: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The WebUI file's tensors for each component's peft adapter state (`adapter_state`)."""
    out = {}
    for component in COMPONENTS:
        modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in (states.get(component) or {}).items():
            path, part = key.rsplit(".", 1)
            if not part.startswith(PREFIXES[network_type]):
                raise ValueError(f"{component}.{key}: not a {network_type} weight")
            modules[path][part] = tensor
        for path, parts in modules.items():
            path = canonical_text_encoder_path(path) if component != "unet" else path
            name, module_alpha = kohya_name(f"{component}.{path}", base), alpha
            if network_type == "lokr" and {"lokr_w1", "lokr_w2"} <= set(parts):  # loaders apply no scale here
                parts = {**parts, "lokr_w1": parts["lokr_w1"] * (alpha / rank)}
                module_alpha = rank
            out.update({f"{name}.{part}": (t if dtype is None else t.to(dtype)).contiguous() for part, t in parts.items()})
            out[f"{name}.alpha"] = torch.tensor(float(module_alpha))
    return out

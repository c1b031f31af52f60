"""Published Stable Diffusion configs, shipped with the package (assets/single_file/<base>/, the
diffusers config folders of SD 1.5, SD 2.1(-base) and SDXL 1.0 base, without weights): the
single-file loader reads them, and the WebUI key maps and the benchmarks build models of the real
size from them on the meta device or with random weights (no download)."""
from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "single_file"
CLIP_BPE = Path(__file__).resolve().parent.parent / "assets" / "clip_bpe"  # CLIP's vocab.json + merges.txt


def published_config(base: str, component: str) -> dict:
    """A component's config of a shipped base (`sd_v1`, `sd_v2`, `sd_v2_v`, `sdxl`), as keyword
    arguments of its class (diffusers' bookkeeping keys dropped)."""
    folder = CONFIGS / base / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return {k: v for k, v in json.loads((folder / name).read_text()).items() if not k.startswith("_")}


# SD 1.5's UNet (SD 2.x has the same module names) and SDXL 1.0 base's (2.6 B parameters;
# attention_head_dim is the number of heads per level there, 64 channels each).
SD15_UNET_CONFIG = published_config("sd_v1", "unet")
SDXL_UNET_CONFIG = published_config("sdxl", "unet")

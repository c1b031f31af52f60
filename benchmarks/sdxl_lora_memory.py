"""Peak memory and s/step of LoRA training on an SDXL-size UNet (2.6 B parameters, random weights,
no download): 1024 px, batch 1, rank 16, UNet only, cached text outputs.

Built from SDXL 1.0 base's published config (shipped in dreambooth_offset/assets/single_file/sdxl);
what each step does: benchmarks/lora_memory.py. Meant for a GPU:

    python benchmarks/sdxl_lora_memory.py --steps 20                # fp16, 8-bit AdamW
    python benchmarks/sdxl_lora_memory.py --steps 20 --dtype bf16

On a CPU it runs too, as a smoke check at a small size (--resolution 256 --steps 1 --dtype bf16
--optimizer adamw); memory is then not reported.
"""
from __future__ import annotations

from lora_memory import arguments, measure

from dreambooth_offset.training.architectures import SDXL_UNET_CONFIG
from dreambooth_offset.training.family import DEFAULT_NOISE_OFFSET, SDXL

if __name__ == "__main__":
    measure("SDXL", SDXL_UNET_CONFIG, arguments(__doc__, resolution=1024, rank=16), DEFAULT_NOISE_OFFSET[SDXL])

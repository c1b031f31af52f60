"""Peak memory and s/step of LoRA training on an SD 1.5-size UNet (random weights, no download).

Built from SD 1.5's published config (shipped in dreambooth_offset/assets/single_file/sd_v1);
what each step does: benchmarks/lora_memory.py. Meant for a GPU:

    python benchmarks/sd15_lora_memory.py --resolution 512 --batch 1 --steps 30

On a CPU it runs too (slowly; use --resolution 256 --steps 2 as a smoke check); memory is then
not reported.
"""
from __future__ import annotations

from lora_memory import arguments, measure

from dreambooth_offset.training.architectures import SD15_UNET_CONFIG

if __name__ == "__main__":
    measure("SD 1.5", SD15_UNET_CONFIG, arguments(__doc__, resolution=512, rank=4), noise_offset=0.1)

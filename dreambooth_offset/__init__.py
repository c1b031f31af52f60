"""dreambooth-offset: DreamBooth LoRA fine-tuning of Stable Diffusion with offset noise."""

__version__ = "0.1.0"

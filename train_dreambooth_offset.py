"""Entry script, kept for users of diffusers' `train_dreambooth_lora.py`: same as `dreambooth-offset train`."""
import sys

from dreambooth_offset.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))

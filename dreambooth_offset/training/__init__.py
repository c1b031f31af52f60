"""The trainer: data, batches, models, LoRA, optimizer, checkpoints, and the loop (train.py)."""

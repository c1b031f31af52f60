"""Run by test_distributed under torchrun: train, then dump this process's LoRA weights so the
test can compare the processes (the trainer itself writes only on the main process).
Arguments: model, instance folder, output folder, dump folder, extra trainer settings as JSON."""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreambooth_offset.config import load_config
from dreambooth_offset.training.lora import lora_state_dicts
from dreambooth_offset.training.train import train

torch.set_num_threads(1)
model, instance_dir, out, dump = sys.argv[1:5]
cfg = load_config(None, {
    "pretrained_model_name_or_path": model, "instance_data_dir": instance_dir, "instance_prompt": "a photo of sks dog",
    "resolution": 16, "train_batch_size": 1, "max_train_steps": 3, "learning_rate": 1e-2, "output_dir": out,
    "report_to": "none", "optimizer": "adamw8bit", "checkpointing_steps": 2,
    **json.loads(sys.argv[5]),  # the test's extra settings
})
result = train(cfg)
from accelerate import PartialState

state = PartialState()
unet_state, _ = lora_state_dicts(result.unet)
Path(dump).mkdir(parents=True, exist_ok=True)
save_file(unet_state, os.path.join(dump, f"rank{state.process_index}_of_{state.num_processes}.safetensors"))

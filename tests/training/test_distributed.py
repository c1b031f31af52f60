"""Data parallel on CPU: torchrun with 2 processes gives accelerate's MULTI_CPU mode (gloo)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.slow
def test_two_processes_end_with_identical_lora_and_one_output(tiny_model, instance_dir, tmp_path):
    """With output preservation and a trained text encoder: the twin rows take a second forward
    with gradients through the DDP-wrapped UNet and text encoder before the one backward."""
    extra = {"output_preservation_prompts": ["", "a photo of dog"], "train_text_encoder": True}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out, dump = tmp_path / "out", tmp_path / "dump"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(Path(__file__).with_name("ddp_worker.py")),
         str(tiny_model), str(instance_dir), str(out), str(dump), json.dumps(extra)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(dump / f"rank{i}_of_2.safetensors") for i in range(2))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    ckpt = out / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("trainer_state_*")) == ["trainer_state_0.safetensors", "trainer_state_1.safetensors"]
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(saved[f"unet.{k}"], r0[k]) for k in r0)

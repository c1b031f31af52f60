"""--use_ema: the output is diffusers' EMA of the raw LoRA weights step by step, validation samples
with it, the raw weights are kept beside it, and a resume continues the average exactly."""
import shutil

import torch
from safetensors.torch import load_file

from dreambooth_offset.cli import main
from dreambooth_offset.training.lora import LORA_WEIGHT_NAME
from tests.tiny import flags


def test_the_output_is_the_average_of_the_raw_weights_and_validation_uses_it(tiny_model, instance_dir, tmp_path,
                                                                             monkeypatch):
    from dreambooth_offset.sampling import validation

    seen = {}
    real = validation.run_validation

    def spy(run, step):
        seen[step] = {n: p.detach().clone() for n, p in run.unet.named_parameters() if "lora_" in n}
        return real(run, step)

    monkeypatch.setattr(validation, "run_validation", spy)
    out = tmp_path / "out"
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=3, checkpointing_steps=1, optimizer="adamw",
                      use_ema=True, ema_decay=0.9, validation_prompt="a photo of sks dog", validation_steps=3,
                      num_validation_images=1, num_inference_steps=1)) == 0
    raw = [load_file(out / f"checkpoint-{k}" / LORA_WEIGHT_NAME) for k in (1, 2)] + [load_file(out / "raw" / LORA_WEIGHT_NAME)]
    # diffusers' EMAModel: decay 0 at step 1 (a copy), then min((1 + t) / (10 + t), ema_decay) with t = step - 1
    expected = {k: v.clone() for k, v in raw[0].items()}
    for t, weights in ((1, raw[1]), (2, raw[2])):
        decay = min((1 + t) / (10 + t), 0.9)
        for k in expected:
            expected[k].sub_((1 - decay) * (expected[k] - weights[k]))
    output = load_file(out / LORA_WEIGHT_NAME)
    assert output.keys() == expected.keys()
    for k in output:
        torch.testing.assert_close(output[k], expected[k], rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(output[k], raw[2][k]) for k in output)  # the average, not the last weights
    validated = seen[3]
    for name, value in validated.items():  # peft's `...lora_A.default.weight` is the file's `unet....lora_A.weight`
        key = "unet." + name.replace(".default", "")
        torch.testing.assert_close(value, output[key], rtol=0, atol=0)


def test_a_resume_continues_the_average_exactly(tiny_model, instance_dir, tmp_path):
    common = {"max_train_steps": 4, "checkpointing_steps": 2, "optimizer": "adamw", "use_ema": True, "ema_decay": 0.9}
    assert main(flags(tiny_model, instance_dir, tmp_path / "full", **common)) == 0
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert main(flags(tiny_model, instance_dir, tmp_path / "resumed", resume_from_checkpoint="latest", **common)) == 0
    for name in (LORA_WEIGHT_NAME, f"raw/{LORA_WEIGHT_NAME}"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

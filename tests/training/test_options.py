"""The training options of issue #17 that change what trains: Prodigy, LoRA+, the text encoders'
learning rate, the timestep range, the saved precision, starting from a LoRA, wandb's absence."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_offset.cli import main
from dreambooth_offset.config import OptimConfig, load_config
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.lora import LORA_WEIGHT_NAME
from dreambooth_offset.training.prepare import prepare
from dreambooth_offset.training.step import optimizer_step
from tests.tiny import flags, overrides


def test_loraplus_and_text_encoder_lr_give_each_matrix_its_rate(tiny_model, instance_dir, tmp_path):
    from dreambooth_offset.training.optim import param_groups

    run = prepare(overrides(tiny_model, instance_dir, tmp_path / "out", optimizer="adamw", train_text_encoder=True))
    models = [run.unet, run.text_encoder]
    plain = param_groups(models, OptimConfig(learning_rate=1e-3, text_encoder_lr=5e-5))
    assert [g["lr"] for g in plain] == [1e-3, 5e-5]
    assert [len(g["params"]) for g in plain] == [sum(p.requires_grad for p in m.parameters()) for m in models]

    groups = param_groups(models, OptimConfig(learning_rate=1e-3, text_encoder_lr=5e-5, loraplus_lr_ratio=16))
    names = {id(p): n for m in models for n, p in m.named_parameters()}
    rates = {}
    for g in groups:
        for p in g["params"]:
            rates[names[id(p)]] = g["lr"]
    te = {n for n, _ in run.text_encoder.named_parameters()}
    for name, lr in rates.items():
        base = 5e-5 if name in te else 1e-3
        assert lr == pytest.approx(base * (16 if "lora_B" in name else 1)), name
    assert len(rates) == sum(len(g["params"]) for g in plain)  # every LoRA weight, once
    assert {g["lr"] for g in run.optimizer.param_groups} == {run.config.optim.learning_rate}  # no split asked


def test_prodigy_grows_its_step_size_and_resumes_exactly(tiny_model, instance_dir, tmp_path):
    pytest.importorskip("prodigyopt")
    run = prepare(overrides(tiny_model, instance_dir, tmp_path / "probe", optimizer="prodigy", learning_rate=1.0,
                            max_train_steps=12))
    d0 = run.optimizer.param_groups[0]["d"]
    for step in range(12):  # on the tiny model d stays at d0 for about 6 steps, then grows each few
        optimizer_step(run, step)
    assert d0 == 1e-6 and run.optimizer.param_groups[0]["d"] > 10 * d0

    common = {"optimizer": "prodigy", "learning_rate": 1.0, "max_train_steps": 4, "checkpointing_steps": 2,
              "train_text_encoder": True}
    assert main(flags(tiny_model, instance_dir, tmp_path / "full", **common)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed / "checkpoint-2")
    assert main(flags(tiny_model, instance_dir, resumed, **common, resume_from_checkpoint="latest")) == 0
    a, b = load_file(tmp_path / "full" / LORA_WEIGHT_NAME), load_file(resumed / LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="prodigy' takes one learning rate"):
        OptimConfig(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=0.5)


def test_timesteps_are_drawn_from_the_range(tmp_path):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from dreambooth_offset.training.batches import Batch
    from dreambooth_offset.training.family import Conditioning
    from dreambooth_offset.training.step import train_step

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, sample, timesteps, context, added_cond_kwargs=None):
            seen["t"] = timesteps
            return SimpleNamespace(sample=torch.zeros_like(sample))

    cfg = load_config(None, {"noise_offset": 0.0, "min_timestep": 900, "max_timestep": 950})
    batch = Batch(torch.zeros(64, 4, 2, 2), torch.zeros(64, 77, dtype=torch.long), Conditioning(torch.zeros(64, 77, 8)), 64)
    train_step(Probe(), None, DDPMScheduler(), batch, cfg, torch.Generator().manual_seed(0))
    assert 900 <= seen["t"].min() and seen["t"].max() < 950 and len(set(seen["t"].tolist())) > 20
    with pytest.raises(UsageError, match="0 <= min_timestep < max_timestep"):
        load_config(None, {"min_timestep": 500, "max_timestep": 500})


def test_max_timestep_beyond_the_scheduler_is_refused(tiny_model, instance_dir, tmp_path):
    with pytest.raises(UsageError, match="timesteps 0..999"):
        prepare(overrides(tiny_model, instance_dir, tmp_path / "out", max_timestep=1001))


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_rounds_the_final_files_and_keeps_checkpoints_fp32(sd1_model, instance_dir, tmp_path,
                                                                         precision, dtype):
    common = {"max_train_steps": 3, "checkpointing_steps": 2, "optimizer": "adamw", "output_name": "sks",
              "text_encoder_lr": 3e-3, "loraplus_lr_ratio": 4.0}
    assert main(flags(sd1_model, instance_dir, tmp_path / "float", **common)) == 0
    assert main(flags(sd1_model, instance_dir, tmp_path / precision, save_precision=precision, **common)) == 0
    for name in (LORA_WEIGHT_NAME, "sks.safetensors"):
        full, low = load_file(tmp_path / "float" / name), load_file(tmp_path / precision / name)
        weights = {k for k in full if not k.endswith(".alpha")}  # the WebUI alphas stay fp32 scalars: exact
        assert {v.dtype for v in full.values()} == {torch.float32} and {low[k].dtype for k in weights} == {dtype}
        assert all(torch.equal(low[k], full[k].to(dtype)) for k in full)  # the same weights, rounded once
    checkpoint = load_file(tmp_path / precision / "checkpoint-2" / LORA_WEIGHT_NAME)
    assert {v.dtype for v in checkpoint.values()} == {torch.float32}
    with safe_open(str(tmp_path / precision / "sks.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_save_precision"], meta["ss_unet_lr"], meta["ss_text_encoder_lr"],
            meta["ss_loraplus_lr_ratio"]) == (precision, "0.01", "0.003", "4.0")


def test_network_weights_start_from_the_file_and_other_shapes_are_refused(sd1_model, tiny_model, instance_dir,
                                                                          tmp_path):
    from dreambooth_offset.training.lora import adapter_state

    first = tmp_path / "first"
    assert main(flags(sd1_model, instance_dir, first, max_train_steps=2, optimizer="adamw", output_name="sks",
                      train_text_encoder=True, lora_alpha=8)) == 0
    trained = load_file(first / LORA_WEIGHT_NAME)
    for source in (first / LORA_WEIGHT_NAME, first / "sks.safetensors"):  # diffusers and WebUI files
        run = prepare(overrides(sd1_model, instance_dir, tmp_path / source.stem, optimizer="adamw",
                                train_text_encoder=True, lora_alpha=2, network_weights=str(source)))
        scale = {"unet": 8 / 4 / (2 / 4), "text_encoder": 8 / 4 / (2 / 4)}  # the file's alpha kept
        for component, model in (("unet", run.unet), ("text_encoder", run.text_encoder)):
            state = adapter_state(model)
            for key, value in state.items():
                want = trained[f"{component}.{key}"]  # the diffusers file keeps peft's names
                if "lora_B" in key:
                    want = want * scale[component]
                torch.testing.assert_close(value, want, rtol=1e-6, atol=0)
    with pytest.raises(UsageError, match=r"module \S+ has shapes .* \(--rank 8"):
        prepare(overrides(sd1_model, instance_dir, tmp_path / "rank8", optimizer="adamw", rank=8,
                          train_text_encoder=True, network_weights=str(first / LORA_WEIGHT_NAME)))
    with pytest.raises(UsageError, match=r"module text_encoder\.\S+ has no LoRA in this run \(check --train_text_encoder"):
        prepare(overrides(sd1_model, instance_dir, tmp_path / "no-te", optimizer="adamw",
                          network_weights=str(first / LORA_WEIGHT_NAME)))
    with pytest.raises(UsageError, match="or the file is for another model"):
        prepare(overrides(tiny_model, instance_dir, tmp_path / "other", optimizer="adamw", train_text_encoder=True,
                          network_weights=str(first / LORA_WEIGHT_NAME)))


def test_report_to_wandb_without_wandb_is_one_line(tiny_model, instance_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(flags(tiny_model, instance_dir, tmp_path / "out", report_to="wandb", max_train_steps=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the wandb package" in err[0]
    assert not json.dumps(err).count("Traceback")


def test_torch_compile_trains_the_same_lora_and_reports_the_first_step(tiny_model, instance_dir, tmp_path, capsys):
    """--torch_compile compiles the UNet in place (its state dict and peft's adapters stay where they
    were); with the eager backend dynamo runs the same ATen ops as no compile, so the LoRA is the
    same bit for bit. Inductor generates other kernels (and needs a C++ compiler): not run here."""
    common = {"optimizer": "adamw", "max_train_steps": 3}
    assert main(flags(tiny_model, instance_dir, tmp_path / "plain", **common)) == 0
    assert main(flags(tiny_model, instance_dir, tmp_path / "compiled", **common, torch_compile=True,
                      dynamo_backend="eager")) == 0
    printed = capsys.readouterr().out
    assert "with torch.compile's compilation, then" in printed and "(first step" in printed
    a, b = load_file(tmp_path / "plain" / LORA_WEIGHT_NAME), load_file(tmp_path / "compiled" / LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_piecewise_constant_schedule_follows_its_step_rules_per_process():
    """diffusers' piecewise-constant schedule: the rate times 1 before step 3, a tenth from there; with 2
    processes accelerate steps the scheduler twice per optimizer step, so the boundary moves to 6."""
    from dreambooth_offset.config import TrainConfig
    from dreambooth_offset.training.optim import make_lr_scheduler

    cfg = OptimConfig(learning_rate=0.5, lr_scheduler="piecewise_constant", lr_step_rules="1:3,0.1")
    for processes in (1, 2):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
        scheduler = make_lr_scheduler(optimizer, cfg, TrainConfig(max_train_steps=6), processes)
        rates = []
        for _ in range(6 * processes):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert rates == pytest.approx([0.5] * 3 * processes + [0.05] * 3 * processes, rel=1e-12)


@pytest.mark.parametrize("keys, message", [
    ({"lr_scheduler": "piecewise_constant"}, "needs it"),
    ({"lr_step_rules": "1:3,0.1"}, "goes with lr_scheduler"),
    ({"lr_scheduler": "piecewise_constant", "lr_step_rules": "1:3;0.1"}, "expected 'multiplier:step"),
    ({"lr_scheduler": "piecewise_constant", "lr_step_rules": "1:30,0.5:20,0.1"}, "rising"),
    ({"lr_scheduler": "piecewise_constant", "lr_step_rules": "1:3,-0.1"}, ">= 0"),
])
def test_step_rules_without_their_schedule_or_out_of_shape_are_refused(keys, message):
    with pytest.raises(UsageError, match=message):
        OptimConfig(**keys)

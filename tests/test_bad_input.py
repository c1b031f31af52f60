"""Bad files and bad values, one row per case: the exit code (2 for bad input, 1 for a failure
while running, 0 for a warning), one line on stderr that names the file, flag or key at fault, no
traceback, and nothing half-written. docs/errors.md lists the same cases with their messages.
The training-data cases are in tests/bad_data_cases.py; the registry in tests/bad_input_table.py."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreambooth_offset.cli import main
from tests import bad_data_cases  # noqa: F401  (registers the training-data cases)
from tests.bad_input_table import CASES, Case, _train, case
from tests.tiny import flags


# --- the base model --------------------------------------------------------------------------------

@case(2, "does not exist")
def missing_model_folder(ctx):
    return flags(ctx.tmp / "no-model", ctx.instance_dir, ctx.out, max_train_steps=1)


@case(2, "not a diffusers Stable Diffusion folder")
def folder_that_is_not_a_model(ctx):
    (ctx.tmp / "photos").mkdir()
    return flags(ctx.tmp / "photos", ctx.instance_dir, ctx.out, max_train_steps=1)


@case(2, "neither a local folder nor in the local hub cache")
def uncached_hub_id(ctx):
    ctx.monkeypatch.setenv("HF_HOME", str(ctx.tmp / "hf"))
    return flags("someone/not-cached-model", ctx.instance_dir, ctx.out, max_train_steps=1)


@case(2, "no file named diffusion_pytorch_model.safetensors")
def model_without_unet_weights(ctx):
    """Pickled weights are never a fallback: only .safetensors files load."""
    broken = shutil.copytree(ctx.model, ctx.tmp / "broken")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    return flags(broken, ctx.instance_dir, ctx.out, max_train_steps=1, optimizer="adamw")


@case(2, "a pickle file, which can run code when loaded, so it is never unpickled")
def ckpt_checkpoint_as_the_base(ctx):
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ctx.tmp / "model.ckpt")
    return flags(ctx.tmp / "model.ckpt", ctx.instance_dir, ctx.out, max_train_steps=1)


@case(2, "not a Stable Diffusion checkpoint (no UNet under model.diffusion_model.)")
def lora_file_as_the_base(ctx):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, ctx.tmp / "lora.safetensors")
    return flags(ctx.tmp / "lora.safetensors", ctx.instance_dir, ctx.out, max_train_steps=1)


# --- values ------------------------------------------------------------------------------------------

@case(2, "learning_rate = nan: it must be a finite number > 0")
def learning_rate_nan(ctx):
    return _train(ctx, ctx.instance_dir, learning_rate="nan")


@case(2, "learning_rate = 0.0: it must be a finite number > 0")
def learning_rate_zero(ctx):
    return _train(ctx, ctx.instance_dir, learning_rate=0)


@case(2, "learning_rate = -0.001")
def learning_rate_negative(ctx):
    return _train(ctx, ctx.instance_dir, learning_rate=-1e-3)


@case(2, "max_train_steps = 0: it must be at least 1")
def zero_steps(ctx):
    return flags(ctx.model, ctx.instance_dir, ctx.out, max_train_steps=0)


@case(2, "max_train_steps = -5: it must be at least 1")
def negative_steps(ctx):
    return flags(ctx.model, ctx.instance_dir, ctx.out, max_train_steps=-5)


@case(2, "rank = 0: it must be at least 1")
def rank_zero(ctx):
    return _train(ctx, ctx.instance_dir, rank=0)


@case(2, "resolution = 20: it must be a positive multiple of 8")
def resolution_not_multiple_of_8(ctx):
    return _train(ctx, ctx.instance_dir, resolution=20)


@case(2, "with_prior_preservation needs class_prompt")
def prior_preservation_without_class_prompt(ctx):
    return _train(ctx, ctx.instance_dir, with_prior_preservation=True, class_data_dir=ctx.tmp / "c")


@case(2, "output_preservation_weight = -1.0: it must be 0 or more")
def negative_output_preservation_weight(ctx):
    return _train(ctx, ctx.instance_dir, output_preservation_prompts=[""], output_preservation_weight=-1)


@case(2, "zero_terminal_snr needs prediction_type = 'v_prediction'")
def zero_terminal_snr_with_epsilon(ctx):
    return _train(ctx, ctx.instance_dir, zero_terminal_snr=True)


@case(2, "noise_offset = -0.1: it must be >= 0")
def negative_noise_offset(ctx):
    return _train(ctx, ctx.instance_dir, noise_offset=-0.1)


# --- config files ------------------------------------------------------------------------------------

@case(2, "cannot read config file")
def config_file_missing(ctx):
    return _train(ctx, ctx.instance_dir, config=ctx.tmp / "nope.toml")


@case(2, "is not valid TOML")
def config_file_not_toml(ctx):
    (ctx.tmp / "run.toml").write_text("rank = = 4\n")
    return _train(ctx, ctx.instance_dir, config=ctx.tmp / "run.toml")


@case(2, "rank must be int, got 'four'")
def config_value_of_the_wrong_type(ctx):
    (ctx.tmp / "run.toml").write_text('rank = "four"\n')
    return _train(ctx, ctx.instance_dir, config=ctx.tmp / "run.toml")


@case(2, "unknown config key 'learning_rat'")
def config_key_misspelt(ctx):
    (ctx.tmp / "run.toml").write_text("learning_rat = 1e-4\n")
    return _train(ctx, ctx.instance_dir, config=ctx.tmp / "run.toml")


# --- resuming and the output folder ------------------------------------------------------------------

@case(2, "not a checkpoint folder of this trainer")
def resume_from_nothing(ctx):
    return _train(ctx, ctx.instance_dir, resume_from_checkpoint=ctx.tmp / "checkpoint-9")


@case(2, "trainer_state_0.safetensors is damaged or truncated")
def resume_from_a_truncated_checkpoint(ctx):
    folder = shutil.copytree(ctx.checkpoint, ctx.out / "checkpoint-1")
    state = folder / "trainer_state_0.safetensors"
    state.write_bytes(state.read_bytes()[:-40])
    return _train(ctx, ctx.instance_dir, resume_from_checkpoint="latest", max_train_steps=2)


@case(2, "optimizer.bin is missing or empty")
def resume_from_a_checkpoint_without_its_optimizer(ctx):
    folder = shutil.copytree(ctx.checkpoint, ctx.out / "checkpoint-1")
    (folder / "optimizer.bin").unlink()
    return _train(ctx, ctx.instance_dir, resume_from_checkpoint="latest", max_train_steps=2)


@case(2, "not writable")
def output_folder_under_a_file(ctx):
    (ctx.tmp / "file").write_text("")
    ctx.out = ctx.tmp / "file" / "out"
    return _train(ctx, ctx.instance_dir)


# --- LoRA files for generate, export, import, inspect --------------------------------------------------

def _generate(ctx, lora, **extra):
    argv = ["generate", "--pretrained_model_name_or_path", str(ctx.model), "--lora", str(lora), "--prompt", "a",
            "--num_images", "1", "--num_inference_steps", "2", "--output_dir", str(ctx.out)]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def _truncated_lora(ctx) -> Path:
    whole = (ctx.lora / "pytorch_lora_weights.safetensors").read_bytes()
    path = ctx.tmp / "cut.safetensors"
    path.write_bytes(whole[: len(whole) - 100])
    return path


@case(2, "cut.safetensors: not a safetensors file")
def generate_with_a_truncated_lora(ctx):
    return _generate(ctx, _truncated_lora(ctx))


@case(2, "a pickle file, which can run code when loaded, so it is never unpickled")
def generate_with_a_ckpt(ctx):
    torch.save({"x": torch.zeros(1)}, ctx.tmp / "model.ckpt")
    return _generate(ctx, ctx.tmp / "model.ckpt")


@case(2, "made for another model")
def generate_with_a_lora_of_another_architecture(ctx):
    return _generate(ctx, ctx.sd1_lora)  # 768-wide cross-attention on the 8-wide tiny base


@case(2, "unknown key 'weight'")
def generate_with_a_file_without_lora_keys(ctx):
    save_file({"weight": torch.zeros(2, 2)}, ctx.tmp / "plain.safetensors")
    return _generate(ctx, ctx.tmp / "plain.safetensors")


@case(2, "cut.safetensors: not a safetensors file")
def export_of_a_truncated_file(ctx):
    return ["export", str(_truncated_lora(ctx)), "-o", str(ctx.out / "x.safetensors")]


@case(2, "a pickle file")
def import_of_a_pt_pickle(ctx):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, ctx.tmp / "lora.pt")
    return ["import", str(ctx.tmp / "lora.pt"), "-o", str(ctx.out)]


@case(2, "the file holds no tensors")
def inspect_of_an_empty_file(ctx):
    save_file({}, ctx.tmp / "empty.safetensors")
    return ["inspect", str(ctx.tmp / "empty.safetensors")]


@case(2, "cannot create it")
def generate_into_an_unwritable_folder(ctx):
    (ctx.tmp / "file").write_text("")
    ctx.out = ctx.tmp / "file" / "gen"
    return _generate(ctx, ctx.lora)


@case(1, "No space left on device")
def generate_into_a_full_folder(ctx):
    original = Image.Image.save

    def full(image, fp, *args, **kwargs):
        if str(ctx.out) in str(fp):
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return original(image, fp, *args, **kwargs)

    ctx.monkeypatch.setattr(Image.Image, "save", full)
    return _generate(ctx, ctx.lora)


@case(2, "num_images = 0: it must be at least 1")
def generate_zero_images(ctx):
    return _generate(ctx, ctx.lora, num_images=0)


# --- the table, run -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_model, sd1_model, instance_dir, tmp_path_factory):
    """A LoRA with a checkpoint on the tiny base, and a LoRA of a base with other widths."""
    lora, sd1_lora = tmp_path_factory.mktemp("lora"), tmp_path_factory.mktemp("sd1-lora")
    assert main(flags(tiny_model, instance_dir, lora, max_train_steps=2, checkpointing_steps=1,
                      optimizer="adamw")) == 0
    assert main(flags(sd1_model, instance_dir, sd1_lora, max_train_steps=1, optimizer="adamw")) == 0
    return SimpleNamespace(lora=lora, checkpoint=lora / "checkpoint-1", sd1_lora=sd1_lora)


def run_case(c: Case, ctx) -> tuple[int, str, str]:
    """(exit code, the one line printed about it, all of stderr) of a case."""
    code = main([str(a) for a in c.setup(ctx)])
    err = ctx.capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("dreambooth-offset ", "warning: "))]
    return code, "\n".join(lines), err


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c, tiny_model, instance_dir, trained, tmp_path, monkeypatch, capsys):
    ctx = SimpleNamespace(model=tiny_model, instance_dir=instance_dir, tmp=tmp_path, out=tmp_path / "out",
                          monkeypatch=monkeypatch, capsys=capsys, **vars(trained))
    code, message, err = run_case(c, ctx)
    assert code == c.code, err[-2000:]
    assert "Traceback" not in err
    assert len(message.splitlines()) == 1, err[-2000:]
    assert c.needle in message
    assert c.code != 0 or (ctx.out / "pytorch_lora_weights.safetensors").is_file()
    if code == 2 and not c.name.startswith(("resume", "output")):
        assert not ctx.out.exists() or not any(ctx.out.iterdir()), "a refused run wrote files"

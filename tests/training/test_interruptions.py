"""Interruptions lose nothing: kill -9, Ctrl-C / SIGTERM, a crash mid-checkpoint, a full disk,
a resume with other settings, and two runs into one folder (training/guards.py, checkpoint.py)."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_offset.cli import main
from tests.tiny import flags

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(optimizer="adamw", lora_dropout=0.1, random_flip=True, lr_scheduler="linear", seed=3)
LORA = "pytorch_lora_weights.safetensors"


def _same_lora(a: Path, b: Path) -> None:
    x, y = load_file(a / LORA), load_file(b / LORA)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{a} and {b} differ"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, instance_dir, tmp_path_factory):
    """The reference: 12 steps without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=12, **COMMON)) == 0
    return out


def _message(err: str) -> str:
    """The one line the CLI printed about the failure (progress bars share stderr)."""
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dreambooth-offset ")]
    return line


def _child(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "dreambooth_offset", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def test_kill_9_then_resume_latest_equals_the_uninterrupted_run(tiny_model, instance_dir, tmp_path, uninterrupted,
                                                                capsys):
    out = tmp_path / "killed"
    step = random.Random(14).randint(3, 9)  # a random step, the same one on every run of the suite
    proc = _child(flags(tiny_model, instance_dir, out, max_train_steps=12, checkpointing_steps=1, **COMMON))
    _wait_for(out / f"checkpoint-{step}", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not (out / LORA).exists()
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.suffix != ".tmp")
    assert step <= killed_at < 12
    capsys.readouterr()
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=12, resume_from_checkpoint="latest",
                      **COMMON)) == 0
    assert f"resumed from {out / f'checkpoint-{killed_at}'} at step {killed_at}" in capsys.readouterr().out
    _same_lora(out, uninterrupted)


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "terminated"
    proc = _child(flags(tiny_model, instance_dir, out, max_train_steps=100_000, **COMMON))
    _wait_for(out / "training_config.json", proc)  # written once the handlers are in place
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    err = _message(err)
    assert "stopped by SIGTERM" in err and "--resume_from_checkpoint latest" in err
    (folder,) = out.glob("checkpoint-*")
    assert (folder / LORA).is_file() and not list(out.glob("*.tmp"))


def _signal_at(monkeypatch, step: int, times: int = 1) -> None:
    """Send this process SIGINT `times` times during optimizer step `step` (0-based)."""
    from dreambooth_offset.training import train as loop

    original = loop.optimizer_step

    def step_then_signal(run, i):
        result = original(run, i)
        if i == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "optimizer_step", step_then_signal)


def test_ctrl_c_checkpoints_after_the_step_and_resuming_equals_the_uninterrupted_run(
        tiny_model, instance_dir, tmp_path, uninterrupted, monkeypatch, capsys):
    out = tmp_path / "ctrl-c"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    _signal_at(monkeypatch, step=4)
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=12, **COMMON)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT after step 5 of 12" in err and "checkpoint-5" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-5"] and not (out / LORA).exists()
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers were put back
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=12, resume_from_checkpoint="latest",
                      **COMMON)) == 0
    assert "at step 5" in capsys.readouterr().out
    _same_lora(out, uninterrupted)


def test_a_second_ctrl_c_stops_at_once(tiny_model, instance_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "twice"
    _signal_at(monkeypatch, step=2, times=2)
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=12, **COMMON)) == 130
    assert "stopped" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*")) and not (out / LORA).exists()


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tiny_model, instance_dir, tmp_path, monkeypatch):
    from dreambooth_offset.training import checkpoint

    out = tmp_path / "crash"
    original = checkpoint.save_trainer_state

    def crash_at_step_4(directory, step, generator, process_index):
        if step == 4:
            (directory / "half-written").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt  # stands for the process dying mid-save
        return original(directory, step, generator, process_index)

    monkeypatch.setattr(checkpoint, "save_trainer_state", crash_at_step_4)
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=6, checkpointing_steps=2,
                      checkpoints_total_limit=1, **COMMON)) == 130
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    (out / "checkpoint-6.tmp").mkdir()  # what a kill -9 mid-save leaves: never taken for `latest`
    assert checkpoint.resolve_resume(out, "latest") == out / "checkpoint-2"
    monkeypatch.undo()
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=6, resume_from_checkpoint="latest",
                      **COMMON)) == 0


def test_a_full_disk_while_checkpointing_names_the_path_and_keeps_the_earlier_files(
        tiny_model, instance_dir, tmp_path, monkeypatch, capsys):
    from dreambooth_offset.training import checkpoint

    out = tmp_path / "full"
    original = checkpoint.save_file

    def full_after_step_2(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_after_step_2)
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=6, checkpointing_steps=2, **COMMON)) == 1
    err = _message(capsys.readouterr().err)
    assert "No space left on device" in err and "checkpoint-4.tmp" in err
    assert not (out / "checkpoint-4.tmp").exists() and not (out / "checkpoint-4").exists()
    monkeypatch.undo()
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=6, resume_from_checkpoint="latest",
                      **COMMON)) == 0  # checkpoint-2 is intact and loads


def test_a_full_disk_while_writing_the_lora_keeps_the_old_file(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                 capsys):
    out = tmp_path / "full-lora"
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=2, **COMMON)) == 0
    before = load_file(out / LORA)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(LORA) and Path(dst).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=3, learning_rate=0.5, **COMMON)) == 1
    err = _message(capsys.readouterr().err)
    assert str(out / LORA) in err and "No space left" in err
    after = load_file(out / LORA)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_resume_with_other_settings_is_refused_naming_each_key(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "changed"
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=3, checkpointing_steps=2, **COMMON)) == 0
    changed = {**COMMON, "seed": 4}
    code = main(flags(tiny_model, instance_dir, out, max_train_steps=3, rank=8, noise_offset=0.05,
                      resume_from_checkpoint="latest", **changed))
    err = _message(capsys.readouterr().err)
    assert code == 2
    for key in ("rank: 4 -> 8", "noise_offset: 0.1 -> 0.05", "seed: 3 -> 4"):
        assert key in err
    # what may change on resume: when to stop, checkpoint and validate
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=5, checkpointing_steps=1,
                      resume_from_checkpoint="latest", **COMMON)) == 0


def test_a_second_run_into_the_same_folder_refuses_naming_the_first(tiny_model, instance_dir, tmp_path, capsys):
    from dreambooth_offset.training.guards import output_lock

    out = tmp_path / "busy"
    out.mkdir()
    with output_lock(out):  # the first run, still going
        assert main(flags(tiny_model, instance_dir, out, max_train_steps=2, **COMMON)) == 2
        err = capsys.readouterr().err
        assert "another run is writing there" in err and f"pid {os.getpid()}" in err
        assert not (out / LORA).exists()
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=2, **COMMON)) == 0  # free again

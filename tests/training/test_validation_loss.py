"""Validation loss: held-out instance images leave the training set, the same weights score the
same twice (fixed timesteps, noise and latents), and training moves the score."""
import pytest
import torch

from dreambooth_offset.cli import main
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.prepare import prepare
from dreambooth_offset.training.step import optimizer_step
from dreambooth_offset.training.validation_loss import held_out_indices, validation_loss
from tests.tiny import flags, overrides


def test_the_same_weights_score_the_same_and_training_moves_the_score(tiny_model, instance_dir, tmp_path):
    run = prepare(overrides(tiny_model, instance_dir, tmp_path / "out", optimizer="adamw", validation_split=0.34,
                            train_text_encoder=True))
    assert len(run.batches.images["instance"]) == 2  # 1 of the 3 images held out
    first, again = validation_loss(run, run.held_out), validation_loss(run, run.held_out)
    assert first == again
    torch.randn(100, generator=run.generator)  # the run's generator moving does not move the score
    assert validation_loss(run, run.held_out) == first
    for step in range(2):
        optimizer_step(run, step)
    assert validation_loss(run, run.held_out) != first
    assert held_out_indices(3, 0.34, 0) == held_out_indices(3, 0.34, 0) and len(held_out_indices(10, 0.25, 0)) == 2


def test_the_loss_is_logged_during_training_and_a_split_of_everything_is_refused(tiny_model, instance_dir, tmp_path,
                                                                                 capsys):
    assert main(flags(tiny_model, instance_dir, tmp_path / "out", max_train_steps=4, optimizer="adamw",
                      validation_split=0.34, validate_every_n_steps=2)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation loss" in line]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    with pytest.raises(UsageError, match="leaves none to train on"):
        held_out_indices(1, 0.5, 0)

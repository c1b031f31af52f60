"""Frozen parts no step calls are parked in CPU memory while training (training/offload.py)."""
import torch

from dreambooth_offset.training.prepare import prepare
from dreambooth_offset.training.step import optimizer_step
from tests.tiny import overrides, write_images

COLOURS = [(200, 30, 30), (30, 200, 30)]


def parked(model, images, out, **extra) -> tuple[str, ...]:
    run = prepare(overrides(model, images, out, center_crop=True, **extra))
    names = {id(run.parts.vae): "vae", id(run.parts.text_encoder): "text_encoder",
             id(run.parts.text_encoder_2): "text_encoder_2"}
    return tuple(names[id(m)] for m in run.parked)


def test_parked_parts_are_exactly_those_no_step_calls(tiny_model, tiny_sdxl, tmp_path):
    images = write_images(tmp_path / "inst", COLOURS)
    assert parked(tiny_model, images, tmp_path / "a", cache_latents=True, cache_text_encoder_outputs=True) == \
        ("vae", "text_encoder")
    # fixed captions and a frozen encoder: one context for every step even without the text cache
    assert parked(tiny_model, images, tmp_path / "b") == ("text_encoder",)
    assert parked(tiny_model, images, tmp_path / "c", train_text_encoder=True) == ()
    assert parked(tiny_model, images, tmp_path / "d", cache_latents=True, shuffle_caption=True) == ("vae",)
    assert parked(tiny_sdxl, images, tmp_path / "e", cache_latents=True, cache_text_encoder_outputs=True) == \
        ("vae", "text_encoder", "text_encoder_2")


def test_steps_run_with_the_parked_parts_unusable(tiny_model, tmp_path):
    """The meta device holds no data: any call into a parked part would fail."""
    images = write_images(tmp_path / "inst", COLOURS)
    run = prepare(overrides(tiny_model, images, tmp_path / "out", center_crop=True, random_flip=True,
                            cache_latents=True, cache_text_encoder_outputs=True))
    for module in run.parked:
        module.to("meta")
    batch = run.batches(0, run.generator)
    assert batch.latents.device.type == "cpu" and torch.isfinite(batch.latents).all()
    for step in range(2):
        loss, total = optimizer_step(run, step)
        assert torch.isfinite(torch.tensor(total))

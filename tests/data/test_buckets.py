"""Aspect-ratio buckets (--enable_bucket): kohya's bucket table, the bucket of known sizes, every
batch from one bucket with the crop it records, and bit-exact resume."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_offset.cli import main
from dreambooth_offset.data.buckets import bucket_sizes, epoch_batches, nearest_bucket, no_upscale_bucket
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.data import crop_top_left, draw_bucket_examples, stack_pixels
from dreambooth_offset.training.prepare import prepare
from tests.tiny import assert_resume_is_bit_exact, flags, overrides


def test_the_bucket_table_and_known_sizes():
    table = bucket_sizes(512, 256, 1024, 64)
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768), (256, 1024)} <= set(table)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 256 <= min(w, h) for w, h in table)
    assert nearest_bucket(1920, 1080, table) == (640, 384)  # 16:9 -> 1.67, the nearest ratio
    assert nearest_bucket(1080, 1920, table) == (384, 640)
    assert nearest_bucket(1000, 1000, table) == (512, 512)
    assert no_upscale_bucket(300, 200, 512, 64, "a.png") == (256, 192)  # its own shape, rounded down
    assert no_upscale_bucket(2000, 1000, 512, 64, "b.png") == (704, 320)  # scaled to 512^2 first: 724 x 362
    with pytest.raises(UsageError, match="c.png: 40x600 is smaller than the smallest bucket"):
        no_upscale_bucket(40, 600, 512, 64, "c.png")


def test_an_epoch_holds_every_slot_once_in_one_bucket_batches():
    buckets = [(8, 24)] * 5 + [(16, 16)] * 3 + [(24, 8)]
    batches = epoch_batches(buckets, 2, seed=1, stream=0, epoch=0)
    assert sorted(s for b in batches for s in b) == list(range(9))
    assert all(len({buckets[s] for s in b}) == 1 for b in batches)
    assert sorted(map(len, batches)) == [1, 1, 1, 2, 2, 2]
    assert batches == epoch_batches(buckets, 2, seed=1, stream=0, epoch=0) != epoch_batches(buckets, 2, 1, 0, 1)


def shaped_images(folder, shapes):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


BUCKET_FLAGS = dict(enable_bucket=True, min_bucket_reso=8, max_bucket_reso=32, bucket_reso_steps=8)


def test_batches_come_from_one_bucket_and_class_rows_follow(tiny_model, tmp_path):
    instance = shaped_images(tmp_path / "inst", [(48, 16), (50, 17), (16, 64), (20, 20)])
    classes = shaped_images(tmp_path / "cls", [(16, 16), (30, 16)])
    run = prepare(overrides(tiny_model, instance, tmp_path / "out", train_batch_size=2, random_flip=True,
                            with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a dog",
                            num_class_images=2, **BUCKET_FLAGS))
    # table (area 16^2, steps of 8): 48x16 and 50x17 (ratio ~3) -> 24x8, 16x64 (0.25) -> 8x32, 20x20 -> 16x16
    assert Counter(run.batches.slot_buckets) == {(24, 8): 2, (8, 32): 1, (16, 16): 1}
    seen = Counter()
    for step in range(6):
        batch = run.batches(step, run.generator)
        n = batch.num_instance
        assert batch.latents.shape[0] == 2 * n  # as many class rows as instance rows, one bucket for all
        seen[tuple(batch.latents.shape[2:])] += n
    assert seen == {(4, 12): 4, (16, 4): 2, (8, 8): 2}  # two epochs; the tiny VAE halves each side
    info = run.dataset["bucket_info"]  # kohya's ss_bucket_info
    assert [(b["resolution"], b["count"]) for b in info["buckets"].values()] == [([8, 32], 1), ([16, 16], 1),
                                                                                ([24, 8], 2)]
    assert info["mean_img_ar_error"] == pytest.approx((0 + abs(3 - 50 / 17) + 0 + 0) / 4)


def test_the_recorded_crop_is_the_pixels_taken():
    """SDXL's crop conditioning for a bucket row: the crop's top-left in the mirrored (if flipped)
    image, scaled as the crop is to the bucket; cropping there and resizing gives the row's pixels."""
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 16, 60), dtype=torch.uint8, generator=g)  # wider than 3:1
    examples = draw_bucket_examples("instance", [img], [0] * 8, (24, 8), False, True, g)
    assert {e.flip for e in examples} == {False, True} and len({e.left for e in examples}) > 1
    for e in examples:
        (h, w), scale = e.crop, 24 / e.crop[1]
        assert (h, w) == (16, 48)  # the largest 3:1 crop: full height
        shown = img.flip(-1) if e.flip else img
        left = img.shape[2] - e.left - w if e.flip else e.left
        assert crop_top_left(e, img.shape[2], 16) == (round(e.top * scale), round(left * scale))
        taken = shown[:, e.top:e.top + h, left:left + w].float()[None]
        expected = torch.nn.functional.interpolate(taken, size=(8, 24), mode="bilinear", antialias=True)[0] / 127.5 - 1
        torch.testing.assert_close(stack_pixels([e], {"instance": [img]}, 16)[0], expected, rtol=0, atol=1e-6)


def test_resume_with_buckets_is_bit_exact(tiny_model, tmp_path):
    instance = shaped_images(tmp_path / "inst", [(48, 16), (50, 17), (16, 64), (20, 20)])
    assert_resume_is_bit_exact(tiny_model, instance, tmp_path, max_train_steps=4, checkpointing_steps=2,
                               random_flip=True, seed=2, **BUCKET_FLAGS)


def test_sdxl_time_ids_carry_each_bucket_as_the_target_size(tiny_sdxl, tmp_path):
    instance = shaped_images(tmp_path / "inst", [(48, 16), (16, 64), (20, 20)])
    run = prepare(overrides(tiny_sdxl, instance, tmp_path / "out", train_batch_size=1, **BUCKET_FLAGS))
    for step in range(3):
        batch = run.batches(step, run.generator)
        target = [2 * d for d in batch.latents.shape[2:]]  # the tiny VAE halves each side
        assert batch.time_ids[0, 4:].tolist() == target
        assert batch.time_ids[0, :2].tolist() in ([16, 48], [64, 16], [20, 20])  # the original size
    assert main(flags(tiny_sdxl, instance, tmp_path / "run", max_train_steps=2, **BUCKET_FLAGS)) == 0

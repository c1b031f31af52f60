"""--masked_loss: per-pixel loss weights from the image's alpha (--alpha_mask) or a mask folder
(--conditioning_data_dir), cropped and flipped with the image, averaged to the latent grid."""
import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_offset.cli import main
from dreambooth_offset.errors import UsageError
from dreambooth_offset.noise.objective import dreambooth_loss
from dreambooth_offset.data.images import load_resized
from dreambooth_offset.training.prepare import prepare
from tests.tiny import RESOLUTION, flags, overrides


def test_a_zero_mask_leaves_that_region_without_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(3, 4, 8, 8, generator=g)
    mask = torch.ones(3, 1, 8, 8)
    mask[:2, :, :, :4] = 0  # the instance rows' left half is ignored; the class row counts everywhere
    for weights in (None, torch.tensor([0.5, 2.0, 1.0])):
        pred.grad = None
        dreambooth_loss(pred, target, 2, 1.0, weights, mask=mask).total.backward()
        assert (pred.grad[:2, :, :, :4] == 0).all() and (pred.grad[:2, :, :, 4:] != 0).all()
        assert (pred.grad[2] != 0).all()
    unmasked = dreambooth_loss(pred, target, 2, 1.0).total
    assert torch.equal(dreambooth_loss(pred, target, 2, 1.0, mask=torch.ones(3, 1, 8, 8)).total, unmasked)


def half_transparent(folder, n=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        rgba = rng.integers(0, 255, (RESOLUTION, RESOLUTION, 4), dtype=np.uint8)
        rgba[:, : RESOLUTION // 2, 3], rgba[:, RESOLUTION // 2 :, 3] = 0, 255
        Image.fromarray(rgba, "RGBA").save(folder / f"img{i}.png")
    return folder


def test_the_alpha_channel_becomes_the_mask_and_the_colours_stay(tmp_path):
    folder = half_transparent(tmp_path / "inst")
    paths = sorted(folder.glob("*.png"))
    plain, masked = load_resized(paths, RESOLUTION), load_resized(paths, RESOLUTION, ["alpha", None])
    assert all(torch.equal(p, m[:3]) for p, m in zip(plain, masked))
    assert (masked[0][3, :, : RESOLUTION // 2] == 0).all() and (masked[0][3, :, RESOLUTION // 2 :] == 255).all()
    assert (masked[1][3] == 255).all()  # None: every pixel trained


def test_batches_carry_the_mask_on_the_latent_grid(tiny_model, tmp_path):
    run = prepare(overrides(tiny_model, half_transparent(tmp_path / "inst"), tmp_path / "out", masked_loss=True,
                            alpha_mask=True, center_crop=True))
    batch = run.batches(0, run.generator)
    assert batch.mask.shape == (2, 1, *batch.latents.shape[2:])
    half = batch.latents.shape[3] // 2
    assert (batch.mask[:, :, :, :half] == 0).all() and (batch.mask[:, :, :, half:] == 1).all()


def test_a_mask_folder_needs_a_mask_per_image(tiny_model, instance_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (20, 16), 0).save(masks / "img0.png")
    cfg = overrides(tiny_model, instance_dir, tmp_path / "out", masked_loss=True, conditioning_data_dir=str(masks))
    with pytest.raises(UsageError, match="--conditioning_data_dir .*: no mask for .*img1.png"):
        prepare(cfg)
    for i in (1, 2):
        Image.new("L", (40, 32), 255).save(masks / f"img{i}.png")  # another size: resized to the image's
    batch = prepare(cfg).batches(0, torch.Generator().manual_seed(0))
    assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    assert main(flags(tiny_model, instance_dir, tmp_path / "run", max_train_steps=2, masked_loss=True,
                      conditioning_data_dir=str(masks))) == 0
    with pytest.raises(UsageError, match="masked_loss needs a mask"):
        overrides(tiny_model, instance_dir, tmp_path, masked_loss=True)
    with pytest.raises(UsageError, match="alpha_mask is a mask for masked_loss, which is off"):
        overrides(tiny_model, instance_dir, tmp_path, alpha_mask=True)


def test_a_dataset_files_conditioning_data_dir_masks_its_subset(tiny_model, tmp_path):
    from tests.tiny import write_images

    masked, plain, masks = (write_images(tmp_path / n, [(200, 30, 30)]) for n in ("masked", "plain", "masks"))
    Image.new("L", (20, 16), 0).save(masks / "img0.png")  # black: nothing of this image trains
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[[datasets]]\nresolution = {RESOLUTION}\nbatch_size = 1\nrandom_crop = false\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{masked}"\n  class_tokens = "sks dog"\n'
                    f'  conditioning_data_dir = "{masks}"\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{plain}"\n  class_tokens = "sks cat"\n')
    run = prepare(overrides(tiny_model, "", tmp_path / "out", instance_prompt="", dataset_config=str(toml),
                            masked_loss=True))
    assert run.batches.images["instance"].masks == [masks / "img0.png", None]
    seen = sorted(run.batches(k, run.generator).mask.max().item() for k in range(2))  # one epoch: each image once
    assert seen == [0.0, 1.0]  # the masked subset's image all black, the other all trained
    with pytest.raises(UsageError, match="conditioning_data_dir .* is a mask folder for --masked_loss, which is off"):
        prepare(overrides(tiny_model, "", tmp_path / "out2", instance_prompt="", dataset_config=str(toml)))

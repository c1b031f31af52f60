"""--cache_latents(_to_disk) and --cache_text_encoder_outputs(_to_disk): a second run reads the
entries; a changed image, VAE, resolution, caption or text encoder rebuilds exactly the entries
it affects; a corrupt entry is rebuilt with a warning; training from the cache is the same."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth_offset.cli import main
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.caching import encode_rows, every_crop
from dreambooth_offset.training.family import encode_prompts
from dreambooth_offset.training.prepare import prepare
from tests.tiny import RESOLUTION, assert_resume_is_bit_exact, flags, overrides, write_images

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def cached(model, images, tmp_path, **extra):
    """A prepared run with the latents cached on disk under tmp_path/cache (centre crops, flips)."""
    values = dict(center_crop=True, random_flip=True, cache_latents_to_disk=True, disk_cache_dir=str(tmp_path / "cache"))
    return prepare(overrides(model, images, tmp_path / "out", **{**values, **extra}))


def counts(run) -> tuple[int, int]:
    store = run.batches.cache.store
    return store.read, store.built


def test_changing_one_image_the_vae_or_the_resolution_rebuilds_exactly_its_entries(tiny_model, tmp_path):
    images = write_images(tmp_path / "inst", COLOURS)
    assert counts(cached(tiny_model, images, tmp_path)) == (0, 6)  # 3 images x (plain, mirrored)
    assert counts(cached(tiny_model, images, tmp_path)) == (6, 0)
    noise = np.random.default_rng(1).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "img1.png")  # same name, new pixels
    assert counts(cached(tiny_model, images, tmp_path)) == (4, 2)
    assert counts(cached(tiny_model, images, tmp_path, resolution=8)) == (0, 6)
    other = shutil.copytree(tiny_model, tmp_path / "other-vae")
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    assert counts(cached(other, images, tmp_path)) == (0, 6)
    assert counts(cached(tiny_model, images, tmp_path)) == (6, 0)  # the first VAE's entries are still there
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 6 + 2 + 6 + 6


def test_a_corrupt_entry_is_rebuilt_with_a_warning(tiny_model, tmp_path, capsys):
    images = write_images(tmp_path / "inst", COLOURS)
    cached(tiny_model, images, tmp_path)
    entry = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))[2]
    entry.write_bytes(entry.read_bytes()[:40])  # cut short, as by a full disk or a killed process
    capsys.readouterr()
    assert counts(cached(tiny_model, images, tmp_path)) == (5, 1)
    assert f"cache entry {entry} cannot be read" in capsys.readouterr().err
    assert load_file(entry).keys() == {"mean", "std"}  # whole again
    assert not list(entry.parent.glob(".*.tmp"))  # no temporary file left behind


def test_cached_posteriors_are_the_vaes_and_carry_the_mask(tiny_model, tmp_path):
    folder = tmp_path / "inst"
    folder.mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, (16, 20, 4), dtype=np.uint8)
    rgba[:, :10, 3], rgba[:, 10:, 3] = 0, 255  # the left half is transparent: masked out
    Image.fromarray(rgba, "RGBA").save(folder / "img0.png")
    for name, extra in (("disk", {}), ("memory", {"cache_latents_to_disk": False, "cache_latents": True})):
        run = cached(tiny_model, folder, tmp_path / name, masked_loss=True, alpha_mask=True, **extra)
        rows = every_crop(run.batches.images, RESOLUTION, True)
        mean, std, mask = run.batches.cache(rows)
        alone = [encode_rows(run.parts.vae, [e], run.batches.images, RESOLUTION, True) for e in rows]
        direct = {k: torch.cat([r[k] for r in alone]) for k in alone[0]}  # each entry is its row encoded alone
        assert torch.equal(mean, direct["mean"]) and torch.equal(std, direct["std"])
        assert torch.equal(mask, direct["mask"])
        half = mask.shape[-1] // 2
        assert (mask[0, ..., :half] == 0).all() and (mask[0, ..., half:] == 1).all()
        assert (mask[1, ..., :half] == 1).all()  # the mirrored row's mask is mirrored too
        batch = run.batches(0, run.generator)
        assert all(torch.equal(row, mask[0]) or torch.equal(row, mask[1]) for row in batch.mask)


def test_training_from_the_disk_cache_is_the_memory_cache_and_resumes_exactly(tiny_model, tmp_path):
    images = write_images(tmp_path / "inst", COLOURS)
    common = dict(center_crop=True, random_flip=True)
    assert main(flags(tiny_model, images, tmp_path / "memory", cache_latents=True, **common)) == 0
    disk = dict(cache_latents_to_disk=True, disk_cache_dir=tmp_path / "cache", checkpointing_steps=2, **common)
    a = assert_resume_is_bit_exact(tiny_model, images, tmp_path, **disk)
    memory = load_file(tmp_path / "memory" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], memory[k]) for k in a)


def test_text_encoder_outputs_are_cached_by_caption_and_encoder(tiny_model, tiny_sdxl, tmp_path, capsys):
    images = write_images(tmp_path / "inst", COLOURS[:1])
    for model in (tiny_model, tiny_sdxl):
        values = dict(cache_text_encoder_outputs_to_disk=True, disk_cache_dir=str(tmp_path / "cache"),
                      center_crop=True)
        reports = []
        for prompt in ("a photo of sks dog", "a photo of sks dog", "a photo of sks cat"):
            capsys.readouterr()
            run = prepare(overrides(model, images, tmp_path / "out", instance_prompt=prompt, **values))
            reports.append(next(x for x in capsys.readouterr().out.splitlines() if x.startswith("text-encoder cache")))
            direct = encode_prompts(run.parts.text_encoders, run.batches.input_ids)
            cond = run.batches.embeddings
            assert torch.equal(cond.context, direct.context)
            assert (cond.pooled is None) == (direct.pooled is None)
            assert cond.pooled is None or torch.equal(cond.pooled, direct.pooled)
        assert [r.split(": ")[1].split(" in ")[0] for r in reports] == [
            "0 entries read, 1 built", "1 entries read, 0 built", "0 entries read, 1 built"]


def test_caches_refuse_what_would_make_them_wrong(tiny_model, tmp_path):
    images = write_images(tmp_path / "inst", COLOURS[:1])  # 20 x 16: a random crop without --center_crop
    with pytest.raises(UsageError, match="--cache_latents: crops are random.*--center_crop"):
        prepare(overrides(tiny_model, images, tmp_path / "a", cache_latents=True))
    with pytest.raises(UsageError, match="--cache_text_encoder_outputs with --train_text_encoder"):
        prepare(overrides(tiny_model, images, tmp_path / "b", cache_text_encoder_outputs=True, train_text_encoder=True))
    with pytest.raises(UsageError, match="the captions of .* change every step"):
        prepare(overrides(tiny_model, images, tmp_path / "c", cache_text_encoder_outputs_to_disk=True,
                          shuffle_caption=True))

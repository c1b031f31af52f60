"""Bad-input cases of the training images and captions (the table: tests/test_bad_input.py)."""
from __future__ import annotations

import errno
import os

from PIL import Image

from dreambooth_offset.cli import main
from tests.bad_input_table import _images, _train, case, png_claiming
from tests.tiny import flags


# --- training images and captions -----------------------------------------------------------------

@case(2, "folder does not exist")
def missing_instance_dir(ctx):
    return _train(ctx, ctx.tmp / "nowhere")


@case(2, "no images found")
def empty_instance_dir(ctx):
    (ctx.tmp / "empty").mkdir()
    return _train(ctx, ctx.tmp / "empty")


@case(2, "notes.png: not a readable image")
def text_file_named_png(ctx):
    data = _images(ctx, "data")
    (data / "notes.png").write_text("not a picture")
    return _train(ctx, data)


@case(2, "cut.png: not a readable image")
def truncated_png(ctx):
    data = _images(ctx, "data")
    whole = (data / "img0.png").read_bytes()
    (data / "cut.png").write_bytes(whole[: len(whole) // 2])
    return _train(ctx, data)


@case(2, "zero.png: an empty file")
def zero_byte_image(ctx):
    data = _images(ctx, "data")
    (data / "zero.png").write_bytes(b"")
    return _train(ctx, data)


@case(2, "bomb.png: too many pixels")
def decompression_bomb(ctx):
    data = _images(ctx, "data")
    png_claiming(data / "bomb.png", 20_000, 20_000)
    return _train(ctx, data)


@case(2, "bomb.png: too many pixels")
def decompression_bomb_between_one_and_two_limits(ctx):
    data = _images(ctx, "data")
    png_claiming(data / "bomb.png", 10_000, 10_000)  # 1e8 pixels: Pillow only warns
    return _train(ctx, data)


@case(2, "loop.png: a symbolic link that loops")
def symlink_loop(ctx):
    data = _images(ctx, "data")
    os.symlink("loop.png", data / "loop.png")
    return _train(ctx, data)


@case(2, "gone.png: a symbolic link that loops or leads nowhere")
def dangling_symlink(ctx):
    data = _images(ctx, "data")
    os.symlink(ctx.tmp / "deleted.png", data / "gone.png")
    return _train(ctx, data)


@case(2, "img0.png: cannot read it (Permission denied); check its permissions")
def unreadable_image(ctx):
    data = _images(ctx, "data")
    original = Image.open

    def denied(fp, *args, **kwargs):  # chmod 000 does not stop root, who runs CI
        if str(fp).endswith("img0.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return original(fp, *args, **kwargs)

    ctx.monkeypatch.setattr(Image, "open", denied)
    return _train(ctx, data)


@case(2, "img0.txt: not UTF-8")
def caption_not_utf8(ctx):
    data = _images(ctx, "data")
    (data / "img0.txt").write_bytes("un café".encode("latin-1"))
    return _train(ctx, data, caption_extension=".txt")


@case(2, "junk.png: not a readable image")
def bad_class_image(ctx):
    data, classes = _images(ctx, "data"), _images(ctx, "class")
    (classes / "junk.png").write_text("x")
    return _train(ctx, data, with_prior_preservation=True, class_data_dir=classes, class_prompt="a photo of dog",
                  num_class_images=1)


@case(0, "warning: the caption of")
def caption_longer_than_the_window(ctx):
    """A warning, once for the file, not once per step; training goes on."""
    data = _images(ctx, "data", [(200, 80, 40), (40, 90, 220)])
    (data / "img0.txt").write_text(" ".join(["a photo of sks dog"] * 40))
    (data / "img1.txt").write_text("a photo of sks dog")
    return _train(ctx, data, caption_extension=".txt", max_train_steps=3)


@case(2, "a concept folder is named N_name")
def kohya_folder_without_a_number(ctx):
    _images(ctx, "train/10_sks dog")
    _images(ctx, "train/sks cat")
    return _train(ctx, "", instance_prompt="", train_data_dir=ctx.tmp / "train")


@case(2, "unknown key 'num_repeat' (did you mean 'num_repeats'?)")
def dataset_file_with_a_typo(ctx):
    data = _images(ctx, "data")
    (ctx.tmp / "dataset.toml").write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data}'\n"
                                          "class_tokens = 'sks dog'\nnum_repeat = 10\n")
    return _train(ctx, "", instance_prompt="", dataset_config=ctx.tmp / "dataset.toml")


@case(2, "keep_tokens_separator is not supported by this trainer (yet)")
def dataset_file_with_an_unsupported_kohya_key(ctx):
    data = _images(ctx, "data")
    (ctx.tmp / "dataset.toml").write_text(f"[general]\nkeep_tokens_separator = '|||'\n[[datasets]]\n"
                                          f"[[datasets.subsets]]\nimage_dir = '{data}'\nclass_tokens = 'sks dog'\n")
    return _train(ctx, "", instance_prompt="", dataset_config=ctx.tmp / "dataset.toml")


@case(2, "--caption_column caption: ")
def dataset_without_the_caption_column(ctx):
    data = _images(ctx, "data")
    (data / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "sks dog"}\n')
    return _train(ctx, "", instance_prompt="", dataset_name=data, caption_column="caption")


@case(2, "tiny.png: 4x40 is smaller than the smallest bucket")
def image_smaller_than_the_smallest_bucket(ctx):
    data = _images(ctx, "data")
    Image.new("RGB", (4, 40), (10, 10, 10)).save(data / "tiny.png")
    return _train(ctx, data, enable_bucket=True, bucket_no_upscale=True, min_bucket_reso=8, max_bucket_reso=32,
                  bucket_reso_steps=8)


@case(2, "--cache_latents: crops are random")
def cache_latents_with_random_crops(ctx):
    return _train(ctx, _images(ctx, "data"), cache_latents=True)  # 20 x 16 images, 16 px crops, no --center_crop


@case(0, "cannot be read (SafetensorError")
def corrupt_latent_cache_entry(ctx):
    data, cache = _images(ctx, "data"), ctx.tmp / "cache"
    first = flags(ctx.model, data, ctx.tmp / "first", max_train_steps=1, optimizer="adamw", center_crop=True,
                  cache_latents_to_disk=True, disk_cache_dir=cache)
    assert main([str(a) for a in first]) == 0
    entry = next((cache / "latents").glob("*.safetensors"))
    entry.write_bytes(b"\0" * 7)
    return _train(ctx, data, center_crop=True, cache_latents_to_disk=True, disk_cache_dir=cache)


@case(2, "no mask for")
def masked_loss_without_a_mask_file(ctx):
    (ctx.tmp / "masks").mkdir()
    Image.new("L", (20, 16), 255).save(ctx.tmp / "masks" / "other.png")
    return _train(ctx, _images(ctx, "data"), masked_loss=True, conditioning_data_dir=ctx.tmp / "masks")


@case(0, "anim.gif has 2 frames (an animation); training uses the first")
def animated_gif(ctx):
    data = _images(ctx, "data")
    frames = [Image.new("RGB", (20, 16), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(data / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    return _train(ctx, data)

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_offset.data.images import load_resized
from dreambooth_offset.training.data import epoch_indices, find_images, read_captions
from dreambooth_offset.errors import UsageError


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        find_images(tmp_path / "nope", "instance_data_dir")
    (tmp_path / "notes.txt").write_text("captions are fine")
    with pytest.raises(UsageError, match="no images found"):
        find_images(tmp_path, "instance_data_dir")


def test_non_image_and_truncated_files_are_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "fake.jpg").write_text("not a jpeg")
    with pytest.raises(UsageError, match="fake.jpg"):
        find_images(tmp_path, "instance_data_dir")
    (tmp_path / "fake.jpg").unlink()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="cut.jpg"):
        find_images(tmp_path, "instance_data_dir")


def test_exif_orientation_modes_and_resize(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    Image.new("L", (16, 32), 200).save(tmp_path / "grey.png")
    Image.new("P", (16, 16)).save(tmp_path / "palette.gif")
    paths = find_images(tmp_path, "instance_data_dir")
    out = dict(zip((p.name for p in paths), load_resized(paths, 8)))
    assert out["rot.jpg"].shape == (3, 16, 8)  # portrait after EXIF transpose, short side 8
    assert out["grey.png"].shape == (3, 16, 8)
    assert all(t.shape[0] == 3 and t.dtype == torch.uint8 for t in out.values())


def test_epoch_indices_visit_every_item_once_per_epoch():
    seq = epoch_indices(5, 0, 15, seed=1, stream=0)
    for e in range(3):
        assert sorted(seq[5 * e : 5 * e + 5]) == list(range(5))
    assert epoch_indices(5, 7, 4, seed=1, stream=0) == seq[7:11]  # position alone decides
    assert epoch_indices(5, 0, 15, seed=2, stream=0) != seq


def test_sidecar_captions_override_the_folder_prompt(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("  a red circle on a blue background\n")
    paths = find_images(tmp_path, "instance_data_dir")  # the sidecar is not taken for an image
    assert [p.name for p in paths] == ["a.png", "b.png"]
    assert read_captions(paths, ".txt", "a photo of sks dog") == ["a red circle on a blue background",
                                                                  "a photo of sks dog"]
    assert read_captions(paths, "", "a photo of sks dog") == ["a photo of sks dog"] * 2  # off by default
    (tmp_path / "b.cap").write_text("any extension can hold captions")
    with pytest.raises(UsageError, match="b.cap"):
        find_images(tmp_path, "instance_data_dir")  # not a known sidecar suffix ...
    assert find_images(tmp_path, "instance_data_dir", caption_extension=".cap") == paths  # ... unless named
    assert read_captions(paths, ".cap", "x") == ["x", "any extension can hold captions"]
    (tmp_path / "b.caption").write_bytes(b"\xff\xfe not utf-8 \xc3")
    with pytest.raises(UsageError, match="b.caption"):
        read_captions(paths, ".caption", "x")


def test_deep_cmyk_and_animated_images_are_converted_as_shown(tmp_path, capsys):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # Pillow opens it as I;16
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    paths = find_images(tmp_path, "instance_data_dir")
    assert "anim.gif has 2 frames (an animation); training uses the first" in capsys.readouterr().err
    out = dict(zip((p.name for p in paths), load_resized(paths, 16)))
    grey = out["grey16.png"][0].float()
    # the 16-bit ramp maps to 8 bits by / 257: its mean stays mid-grey (Pillow's clip gave ~254)
    assert abs(grey.mean().item() - 127.5) < 1.0 and grey.min() == 0 and grey.max() == 255
    assert out["cmyk.jpg"].float().mean(dim=(1, 2)).tolist() == [255.0, 0.0, 0.0]
    assert out["anim.gif"].float().mean(dim=(1, 2)).tolist() == [255.0, 0.0, 0.0]


def test_the_image_store_decodes_on_use_with_the_shapes_it_promised(tmp_path):
    from dreambooth_offset.data.images import ImageStore, original_sizes

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    img.save(tmp_path / "rot.jpg", exif=exif)
    Image.new("RGBA", (30, 16), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    paths = find_images(tmp_path, "instance_data_dir")
    store = ImageStore(paths, 8, ["alpha", None], original_sizes(paths))
    assert not any(isinstance(v, torch.Tensor) for v in vars(store).values())  # nothing decoded is kept
    decoded = load_resized(paths, 8, ["alpha", None])
    for i, tensor in enumerate(decoded):
        assert torch.equal(store[i], tensor) and store.shape(i) == tuple(tensor.shape)
    assert store.shape(1) == (4, 16, 8)  # portrait after EXIF, short side 8, with the mask channel
    picked = store.select([1]).rgb()
    assert len(picked) == 1 and torch.equal(picked[0], decoded[1][:3]) and picked.shape(0) == (3, 16, 8)


def test_the_output_folder_check_leaves_other_processes_files_alone(tiny_model, instance_dir, tmp_path):
    """Every process of a multi-GPU launch checks the output folder at the same moment; with one
    fixed probe name, one process could delete the probe another had just written (the two-process
    test failed on it once). The check must neither need nor touch any name in the folder."""
    from dreambooth_offset.config import load_config
    from dreambooth_offset.training.inputs import check_inputs

    out = tmp_path / "out"
    (out / ".write-test").mkdir(parents=True)  # the old probe's name, taken
    cfg = load_config(None, {"pretrained_model_name_or_path": str(tiny_model), "instance_data_dir": str(instance_dir),
                             "instance_prompt": "a photo of sks dog", "output_dir": str(out)})
    check_inputs(cfg)
    assert [p.name for p in out.iterdir()] == [".write-test"]

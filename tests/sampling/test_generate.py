import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_offset.cli import main
from dreambooth_offset.sampling.images import make_grid, to_pil
from dreambooth_offset.sampling.metrics import dark_fraction, mean_luminance
from tests.tiny import flags


def test_luminance_statistics():
    images = torch.zeros(3, 3, 4, 4)
    images[1] = 1.0
    images[2, 1] = 0.5  # green at half: luma 0.7152 * 0.5
    torch.testing.assert_close(mean_luminance(images), torch.tensor([0.0, 1.0, 0.3576]))
    torch.testing.assert_close(dark_fraction(images), torch.tensor([1.0, 0.0, 0.0]))
    grid = make_grid(to_pil(images), cols=2)
    assert grid.size == (8, 8)


def test_antithetic_start_latents_pair_each_seeds_noise_with_its_negation():
    from types import SimpleNamespace

    from dreambooth_offset.sampling.generate import antithetic_start_latents, start_latents

    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)), vae_scale_factor=8)
    pairs, seeds = antithetic_start_latents(pipe, 6, 32, 32), start_latents(pipe, [0, 1, 2], 32, 32)
    assert pairs.shape == (6, 4, 4, 4)
    assert torch.equal(pairs[0::2], seeds) and torch.equal(pairs[1::2], -seeds)
    with pytest.raises(ValueError, match="antithetic pairs"):
        antithetic_start_latents(pipe, 5, 32, 32)


@pytest.mark.parametrize("family", ["tiny_model", "tiny_sdxl"])
def test_generate_with_lora_saves_images_and_prints_luminance(family, request, instance_dir, tmp_path, capsys):
    tiny_model = request.getfixturevalue(family)
    assert main(flags(tiny_model, instance_dir, tmp_path / "lora", max_train_steps=2)) == 0
    out = tmp_path / "gen"
    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_model), "--lora", str(tmp_path / "lora"),
                 "--prompt", "a photo of sks dog", "a solid black image", "--num_images", "2", "--seed", "3",
                 "--num_inference_steps", "2", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "mean luminance" in printed and "seed 4" in printed
    assert len(list(out.glob("prompt*_seed*.png"))) == 4 and len(list(out.glob("*_grid.png"))) == 2
    stats = json.loads((out / "stats.json").read_text())
    # the printed and saved figures describe the saved images (PNG rounds each pixel to 1/255)
    for p_idx, prompt in enumerate(["a photo of sks dog", "a solid black image"]):
        for seed, value in zip(stats[prompt]["seeds"], stats[prompt]["mean_luminance"]):
            saved = torch.from_numpy(np.array(Image.open(out / f"prompt{p_idx:02d}_seed{seed}.png"))).permute(2, 0, 1)
            assert abs(float(mean_luminance(saved[None].float() / 255)) - value) <= 0.5 / 255 + 1e-6


def test_generate_bad_lora_path(tiny_model, tmp_path, capsys):
    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_model), "--lora", str(tmp_path / "nope"),
                 "--prompt", "x", "--output_dir", str(tmp_path / "gen")])
    assert code == 2 and "nope" in capsys.readouterr().err


def test_generate_names_a_lora_whose_metadata_this_peft_cannot_read(tiny_model, instance_dir, tmp_path, capsys):
    # diffusers builds LoraConfig(**metadata): a field this peft does not know (a file from a newer
    # peft) raises TypeError, which must come out as a one-line error naming the file
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    assert main(flags(tiny_model, instance_dir, tmp_path / "lora", max_train_steps=1)) == 0
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    adapter = json.loads(metadata["lora_adapter_metadata"])
    metadata["lora_adapter_metadata"] = json.dumps({**adapter, "unet.a_field_from_the_future": 1})
    save_file(load_file(path), path, metadata=metadata)
    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_model), "--lora", str(path),
                 "--prompt", "x", "--num_images", "1", "--num_inference_steps", "1", "--output_dir", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "a_field_from_the_future" in err and "Traceback" not in err

"""`pretrain-base` runs end to end for a few steps and writes a loadable SD folder."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_offset.base_model import build, pretrain
from dreambooth_offset.cli import main

TINY = ["--resolution", "32", "--num_images", "16", "--vae_channels", "8", "16", "--vae_steps", "2",
        "--vae_batch_size", "2", "--unet_channels", "8", "16", "--attention_levels", "1",
        "--norm_num_groups", "2", "--cross_attention_dim", "8", "--unet_steps", "2",
        "--batch_size", "2", "--profile_seeds", "1", "--profile_steps", "2", "--num_threads", "1"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert main(["pretrain-base", "--output_dir", str(out), *TINY]) == 0
    return out


def test_folder_loads_through_the_real_checkpoint_path(tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the data, not SD's literal
    assert pipe.unet.config.sample_size == 16  # 32 px through a 2-block VAE
    pipe.set_progress_bar_config(disable=True)
    image = pipe("A solid black image", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)
    for sub in ("unet", "vae", "text_encoder"):
        assert list((tiny_base / sub).glob("*.safetensors"))
    assert (tiny_base / "README.md").read_text().count("mean luminance") >= 1
    assert (tiny_base / "samples.png").exists()
    facts = json.loads((tiny_base / "pretrain.json").read_text())
    assert set(facts["brightness_profile"]) == set(pretrain.PROFILE_PROMPTS)


def test_same_seed_gives_the_same_weights(tiny_base, tmp_path):
    assert main(["pretrain-base", "--output_dir", str(tmp_path), *TINY]) == 0
    name = "unet/diffusion_pytorch_model.safetensors"
    first, second = load_file(tiny_base / name), load_file(tmp_path / name)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_every_caption_word_is_one_token(tiny_base):
    from transformers import CLIPTokenizer

    from dreambooth_offset.base_model.synthetic import caption_words

    tokenizer = CLIPTokenizer.from_pretrained(tiny_base / "tokenizer")
    assert all(len(tokenizer.tokenize(w)) == 1 for w in caption_words())


def test_leak_matched_schedule_keeps_sd_mean_snr():
    # docs/science.md, "The leak": 64x64 is SD itself; 32x32 needs beta_end about 0.00843.
    assert build.leak_matched_beta_end(64) == pytest.approx(0.012, abs=1e-5)
    assert build.leak_matched_beta_end(32) == pytest.approx(0.00843, abs=5e-5)


def test_bad_schedule_is_a_usage_error(tmp_path, capsys):
    assert main(["pretrain-base", "--output_dir", str(tmp_path), "--schedule", "cosine"]) == 2
    assert "--schedule" in capsys.readouterr().err

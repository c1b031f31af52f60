"""Single-file checkpoints as the base: the family from the tensors, the shipped configs, pickles
refused unopened, and a single file trains the same LoRA, bit for bit, as its diffusers folder."""
import hashlib
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.architectures import CONFIGS
from dreambooth_offset.training.single_file import (SHIPPED, config_folder, detect_base, shipped_config,
                                                    tensor_shapes, tokenizer)
from dreambooth_offset.training.train import train
from tests.ldm import write_single_file
from tests.tiny import build_pipeline_folder, overrides

# Parameter counts of the published models (SD 1.5, SD 2.1 and SDXL 1.0 base): UNet, VAE, text encoder(s).
PUBLISHED = {"sd_v1": (859_520_964, 83_653_863, 123_060_480), "sd_v2": (865_910_724, 83_653_863, 340_387_840),
             "sd_v2_v": (865_910_724, 83_653_863, 340_387_840), "sdxl": (2_567_463_684, 83_653_863, 123_060_480)}


@pytest.mark.parametrize("base", SHIPPED)
def test_shipped_configs_build_the_published_models_and_clip_tokens(base):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_offset.training.architectures import published_config

    def count(module):
        return sum(p.numel() for p in module.parameters())

    folder = CONFIGS / base
    with torch.device("meta"):
        models = (UNet2DConditionModel(**published_config(base, "unet")), AutoencoderKL(**published_config(base, "vae")),
                  CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))
        assert tuple(map(count, models)) == PUBLISHED[base]
        if base == "sdxl":
            bigg = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            assert count(bigg) == 694_659_840
    pads = {"tokenizer": "!" if base.startswith("sd_v2") else "<|endoftext|>", "tokenizer_2": "!"}
    for sub in ("tokenizer", "tokenizer_2") if base == "sdxl" else ("tokenizer",):
        tok = tokenizer(folder, sub)
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
        assert tok.pad_token == pads[sub] and tok.model_max_length == 77


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd1_model, tiny_sdxl):
    """(diffusers folder, single file) per family: SD 1.x (CLIP text, 768 wide), SD 2.x-v (OpenCLIP
    text, a v-prediction scheduler) and SDXL."""
    tmp = tmp_path_factory.mktemp("single")
    sd2 = build_pipeline_folder(tmp / "sd2")
    scheduler = sd2 / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    return {kind: (folder, write_single_file(folder, tmp / f"{kind}.safetensors", kind))
            for kind, folder in (("clip", sd1_model), ("openclip", sd2), ("sdxl", tiny_sdxl))}


def test_the_family_comes_from_the_tensors_and_sd2_defaults_to_768_v(files):
    found = {kind: detect_base(path, tensor_shapes(path)) for kind, (_, path) in files.items()}
    assert found == {"clip": "sd_v1", "openclip": "sd_v2", "sdxl": "sdxl"}
    assert shipped_config("sd_v2") == CONFIGS / "sd_v2_v" and shipped_config("sdxl") == CONFIGS / "sdxl"
    with pytest.raises(UsageError, match="describes SDXL, but .* holds SD 1.x/2.x"):
        config_folder(files["clip"][1], "sd_v1", "sdxl")


def test_pickles_and_other_files_are_refused_unopened(tmp_path, files):
    class Trap:
        def __reduce__(self):
            return (open, (str(tmp_path / "unpickled"), "w"))

    for name in ("model.ckpt", "model.safetensors"):  # a pickle under either name
        (tmp_path / name).write_bytes(pickle.dumps({"state_dict": Trap()}))
        with pytest.raises(UsageError, match="a pickle file, which can run code when loaded, so it is never unpickled"):
            tensor_shapes(tmp_path / name)
    assert not (tmp_path / "unpickled").exists()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(UsageError, match="not a Stable Diffusion checkpoint"):
        detect_base(tmp_path / "lora.safetensors", tensor_shapes(tmp_path / "lora.safetensors"))
    unet_only = {k: v for k, v in load_file(files["clip"][1]).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    with pytest.raises(UsageError, match="no text encoder"):
        detect_base(tmp_path / "unet.safetensors", tensor_shapes(tmp_path / "unet.safetensors"))


@pytest.mark.parametrize("kind", ["clip", "openclip", "sdxl"])
def test_a_single_file_trains_the_same_lora_as_its_diffusers_folder(files, kind, instance_dir, tmp_path):
    folder, path = files[kind]
    common = {"train_text_encoder": True, "output_name": "sks", "max_train_steps": 2}
    from_folder = train(overrides(folder, instance_dir, tmp_path / "folder", **common))
    from_file = train(overrides(path, instance_dir, tmp_path / "file", single_file_config=str(folder), **common))
    a, b = load_file(from_folder.lora_path), load_file(from_file.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind == "openclip":  # equal LoRA: the file trained with the config folder's v-prediction too
        return  # (8-wide, so no WebUI file)
    with safe_open(str(tmp_path / "file" / "sks.safetensors"), "pt") as f:
        meta = f.metadata()
    data = path.read_bytes()
    assert meta["ss_sd_model_name"] == path.name
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()

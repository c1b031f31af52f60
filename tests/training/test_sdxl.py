"""SDXL through the same trainer, on a tiny in-process SDXL folder (two text encoders, size/crop
conditioning): the LoRA it writes loads in diffusers' SDXL pipeline and reproduces every trained
model, only adapter weights move, and a resumed run is bit-exact."""

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_offset.cli import main
from dreambooth_offset.training.data import Example, crop_top_left, draw_examples, to_pixels
from dreambooth_offset.training.family import SD, SDXL, family_of
from dreambooth_offset.training.train import train
from tests.tiny import RESOLUTION, assert_resume_is_bit_exact, flags, overrides


def test_the_family_is_read_from_the_folder(tiny_model, tiny_sdxl):
    assert family_of(tiny_model) == SD and family_of(tiny_sdxl) == SDXL


def sdxl_unet_inputs(unet):
    g = torch.Generator().manual_seed(0)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=g),
             "time_ids": torch.tensor([[20.0, 16, 0, 3, 16, 16], [16, 16, 0, 0, 16, 16]])}
    return (torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 77, width, generator=g)), added


def test_sdxl_lora_loads_in_diffusers_and_only_adapters_move(tiny_sdxl, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_offset.webui.lora_file import read_lora_file
    from dreambooth_offset.webui.loaders import key_map_report

    result = train(overrides(tiny_sdxl, instance_dir, tmp_path / "out", train_text_encoder=True, random_flip=True,
                             output_name="sks"))
    state = load_file(result.lora_path)
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    # the WebUI file beside it: SDXL names, the family's noise offset (unset here) recorded
    tensors, header = read_lora_file(tmp_path / "out" / "sks.safetensors")
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_noise_offset"] == "0.0357"
    assert result.config.noise.noise_offset == 0.0357
    assert {k.split("_", 2)[1] for k in tensors} == {"unet", "te1", "te2"}
    assert all(not unmatched for _, unmatched in key_map_report(tensors, "sdxl").values())

    unet, te1, te2 = result.unet.eval(), *(m.eval() for m in result.text_encoders)
    for trained, cls, sub in ((unet, UNet2DConditionModel, "unet"), (te1, CLIPTextModel, "text_encoder"),
                              (te2, CLIPTextModelWithProjection, "text_encoder_2")):
        base = cls.from_pretrained(tiny_sdxl, subfolder=sub).state_dict()
        moved = 0
        for name, value in trained.state_dict().items():
            if "lora_" in name:
                moved += int("lora_B" in name and value.abs().sum() > 0)
            else:
                assert torch.equal(value, base[name.replace(".base_layer", "")]), f"{sub}.{name} changed"
        assert moved > 0, f"no LoRA weight of {sub} trained"

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    (x, t, ctx), added = sdxl_unet_inputs(pipe.unet)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        pipe.load_lora_weights(tmp_path / "out")
        loaded = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        assert (loaded - base).abs().max() > 1e-4
        torch.testing.assert_close(loaded, unet(x, t, ctx, added_cond_kwargs=added).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.text_encoder(ids)[0], te1(ids)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.text_encoder_2(ids)[0], te2(ids)[0], atol=1e-5, rtol=1e-5)


def test_sdxl_resume_equals_the_uninterrupted_run(tiny_sdxl, instance_dir, tmp_path):
    assert_resume_is_bit_exact(tiny_sdxl, instance_dir, tmp_path, max_train_steps=4, checkpointing_steps=2,
                               random_flip=True, optimizer="adamw8bit", train_text_encoder=True, seed=3)


@pytest.mark.parametrize("base_targets", [False, True])
def test_sdxl_prior_preservation_and_validation_sample_through_the_sdxl_pipeline(tiny_sdxl, instance_dir, tmp_path,
                                                                                base_targets):
    """base_targets: the class rows and the instance rows' twins regress on the base's prediction
    (prior_preservation = 'prediction', output preservation), which needs SDXL's pooled text and time ids."""
    class_dir = tmp_path / "class"
    extra = {"prior_preservation": "prediction", "output_preservation_prompts": ["", "a photo of dog"]} \
        if base_targets else {}
    argv = flags(tiny_sdxl, instance_dir, tmp_path / "out", with_prior_preservation=True, class_data_dir=class_dir,
                 class_prompt="a photo of dog", num_class_images=2, num_inference_steps=2, sample_batch_size=2,
                 max_train_steps=2, validation_prompt="a photo of sks dog", validation_steps=2,
                 num_validation_images=1, **extra)
    assert main(argv) == 0
    assert len(list(class_dir.glob("*.png"))) == 2
    assert list((tmp_path / "out").rglob("*.png")), "no validation image written"


@pytest.mark.parametrize("flip", [False, True])
def test_the_crop_coordinates_point_at_the_pixels_trained_on(flip):
    """SDXL's crop conditioning counts the crop in the image as it is shown after the flip:
    cropping the mirrored image at (top, left) gives exactly the pixels the batch holds."""
    img = torch.arange(3 * 18 * 23, dtype=torch.int64).reshape(3, 18, 23).remainder(256).to(torch.uint8)
    examples = draw_examples("instance", [img] * 8, list(range(8)), RESOLUTION, False, flip,
                             torch.Generator().manual_seed(0))
    assert len({(e.top, e.left) for e in examples}) > 1  # the crops differ
    for e in examples:
        top, left = crop_top_left(e, img.shape[2], RESOLUTION)
        shown = img.flip(-1) if e.flip else img
        torch.testing.assert_close(to_pixels(shown, top, left, False, RESOLUTION),
                                   to_pixels(img, e.top, e.left, e.flip, RESOLUTION), rtol=0, atol=0)
    assert crop_top_left(Example("instance", 0, 1, 2, True), 23, RESOLUTION) == (1, 23 - 2 - RESOLUTION)


def test_each_text_encoder_trains_on_its_own_flag_and_a_resume_that_resolves_otherwise_is_refused(
        tiny_sdxl, instance_dir, tmp_path, capsys):
    only_second = train(overrides(tiny_sdxl, instance_dir, tmp_path / "second", train_text_encoder_2=True))
    assert {k.split(".")[0] for k in load_file(only_second.lora_path)} == {"unet", "text_encoder_2"}

    argv = flags(tiny_sdxl, instance_dir, tmp_path / "first", max_train_steps=2, checkpointing_steps=1,
                 train_text_encoder=True)
    assert main([*argv, "--no-train_text_encoder_2"]) == 0
    assert {k.split(".")[0] for k in load_file(tmp_path / "first" / "pytorch_lora_weights.safetensors")} == {
        "unet", "text_encoder"}
    capsys.readouterr()
    assert main([*argv, "--resume_from_checkpoint", "checkpoint-1"]) == 2  # te2 now resolves to True
    assert "train_text_encoder_2: False -> True" in capsys.readouterr().err



def test_the_noise_offset_default_is_the_familys(tiny_model, instance_dir, tmp_path, capsys):
    """SDXL's is checked where an SDXL run writes its files (above); SD's here, end to end."""
    import json

    from dreambooth_offset.training.family import DEFAULT_NOISE_OFFSET

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "0.1 for SD 1.x/2.x" in " ".join(capsys.readouterr().out.split())
    assert main(flags(tiny_model, instance_dir, tmp_path / "sd", max_train_steps=1)) == 0
    saved = json.loads((tmp_path / "sd" / "training_config.json").read_text())
    assert saved["noise_offset"] == DEFAULT_NOISE_OFFSET[SD] == 0.1 and DEFAULT_NOISE_OFFSET[SDXL] == 0.0357

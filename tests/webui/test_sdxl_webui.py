"""SDXL WebUI (kohya) files: SGM UNet names and lora_te1_/lora_te2_ text-encoder names, checked
against SDXL 1.0's published UNet (built on the meta device) and loaded by diffusers' own reader."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_offset.cli import main
from dreambooth_offset.training.lora import LORA_WEIGHT_NAME
from dreambooth_offset.webui import convert as webui_convert, lora_file as webui_file, keys as webui_keys, loaders as webui_loaders, metadata as webui
from tests.webui.test_webui import RANK, TEXT_ALPHA, TEXT_TARGETS, UNET_ALPHA

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
                "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def test_every_sdxl_module_maps_to_exactly_one_sgm_name_and_back():
    unet = webui_keys.sd_unet_modules(sdxl=True)
    sgm = {path: webui_keys.sgm_lora_name(path) for path in unet}
    assert len(unet) == 794 and len(set(sgm.values())) == len(unet)  # one SGM name each, none shared
    # the names are exactly the SGM UNet's modules, listed from its block structure independently
    assert {n.replace("lora_unet_", "diffusion_model_", 1) for n in sgm.values()} == \
        webui_keys.ldm_unet_modules(webui_keys.SDXL_LAYOUT)
    back = webui_keys.ldm_to_diffusers_names(sdxl=True)
    assert all(back[name] == webui_keys._kohya("lora_unet_", path) for path, name in sgm.items())
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert sgm["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"

    one = torch.zeros(1, 1)
    modules = {f"unet.{n}": webui_convert.LoraModule(one, one, 1.0) for n in unet}
    modules |= {f"text_encoder.{n}": webui_convert.LoraModule(one, one, 1.0)
                for n in webui_keys.clip_text_modules(12, 768)}
    modules |= {f"text_encoder_2.{n}": webui_convert.LoraModule(one, one, 1.0)
                for n in webui_keys.clip_text_modules(*webui_keys.SDXL_TEXT_ENCODER_2)}
    keys = webui_convert.modules_to_kohya(modules, base="sdxl")
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}
    report = webui_loaders.key_map_report(keys, "sdxl")
    assert {loader: (matched, len(unmatched)) for loader, (matched, unmatched) in report.items()} == {
        "A1111": (3 * (794 + 72 + 192), 0), "ComfyUI/Forge": (3 * (794 + 72 + 192), 0)}


@pytest.fixture(scope="module")
def trained_sdxl(tiny_sdxl, tmp_path_factory):
    """The tiny SDXL with random (non-zero) LoRA on UNet attention + convs and both text encoders,
    saved by the trainer's `save_lora`."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    from dreambooth_offset.training.lora import save_lora

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=TEXT_ALPHA, target_modules=TEXT_TARGETS, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("trained_sdxl")
    save_lora(folder, pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    return pipe, folder


def outputs(pipe):
    g = torch.Generator().manual_seed(1)
    unet = pipe.unet
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[20.0, 16, 0, 2, 16, 16]])}
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return (unet(sample, torch.tensor([500]), context, added_cond_kwargs=added).sample,
                pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0])


def test_sdxl_export_loads_in_diffusers_with_the_trained_outputs_and_imports_back(trained_sdxl, tiny_sdxl, tmp_path,
                                                                                  capsys):
    from diffusers import StableDiffusionXLPipeline

    def fresh():
        return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)

    pipe, folder = trained_sdxl
    out = tmp_path / "sks.safetensors"
    assert main(["export", str(folder), "-o", str(out)]) == 0  # the base read off text_encoder_2's keys
    printed = capsys.readouterr().out
    assert "base sdxl" in printed and "A1111: 2400/2400 keys" in printed and "ComfyUI/Forge: 2400/2400" in printed
    kohya = load_file(out)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in kohya)
    assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}
    assert kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == TEXT_ALPHA
    assert kohya["lora_unet_input_blocks_1_0_in_layers_2.alpha"].item() == UNET_ALPHA

    webui_pipe = fresh()
    webui_pipe.load_lora_weights(str(out))  # diffusers' kohya reader, SGM names mapped by the pipeline
    base = outputs(fresh())
    for got, want, before in zip(outputs(webui_pipe), outputs(pipe), base):
        assert (want - before).abs().max() > 1e-2  # the adapter changes it
        assert (got - want).abs().max().item() < 1e-5

    back = tmp_path / "back"
    assert main(["import", str(out), "-o", str(back)]) == 0
    original, imported = load_file(folder / LORA_WEIGHT_NAME), load_file(back / LORA_WEIGHT_NAME)
    assert original.keys() == imported.keys() and all(torch.equal(original[k], imported[k]) for k in original)
    again = tmp_path / "again.safetensors"
    assert main(["export", str(back), "-o", str(again)]) == 0
    assert webui.file_sshs_hash(again) == webui.file_sshs_hash(out)
    header = webui_file.read_lora_file(again)[1]
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_v2"] == "False"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert webui_loaders.a1111_sd_version(header) == "SDXL"


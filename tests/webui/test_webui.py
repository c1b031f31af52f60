"""WebUI (kohya) LoRA files: diffusers reads them back exactly, the WebUI key maps take every key."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_offset.training.lora import LORA_WEIGHT_NAME
from dreambooth_offset.webui import convert as webui_convert, lora_file as webui_file, keys as webui_keys, loaders as webui_loaders, metadata as webui
from dreambooth_offset.cli import main

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "conv_out",
                "time_emb_proj", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK, UNET_ALPHA, TEXT_ALPHA = 4, 8, 2  # alpha != rank: the scale diffusers' converter loses


def fresh_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A pipeline with random (non-zero) LoRA on UNet attention + convs and the text encoder,
    saved by the trainer's own `save_lora` (diffusers' file, LoraConfigs in its metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreambooth_offset.training.lora import save_lora

    torch.manual_seed(0)
    pipe = fresh_pipeline(tiny_model)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=TEXT_ALPHA, target_modules=TEXT_TARGETS,
                                             init_lora_weights=False))
    folder = tmp_path_factory.mktemp("trained")
    save_lora(folder, pipe.unet, pipe.text_encoder)
    return pipe, folder, [get_peft_model_state_dict(m) for m in (pipe.unet, pipe.text_encoder)]


def outputs(pipe):
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), context).sample, pipe.text_encoder(ids)[0]


def modules_of(source):
    tensors, header = webui_file.read_lora_file(source)
    return webui_convert.modules_from_diffusers(tensors, webui_file.adapter_metadata(header), None, source)


def test_export_loads_in_diffusers_with_the_trained_outputs_and_imports_back(trained, tiny_model, tmp_path):
    pipe, folder, _ = trained
    out = tmp_path / "sks.safetensors"
    assert main(["export", str(folder), "-o", str(out), "--base", "sd_v1"]) == 0

    webui_pipe = fresh_pipeline(tiny_model)
    webui_pipe.load_lora_weights(str(out))  # diffusers' own kohya reader
    for got, want in zip(outputs(webui_pipe), outputs(pipe)):
        assert (got - want).abs().max().item() < 1e-5
    base_unet, base_text = outputs(fresh_pipeline(tiny_model))
    assert (outputs(pipe)[0] - base_unet).abs().max() > 1e-2  # the adapter does change the outputs
    assert (outputs(pipe)[1] - base_text).abs().max() > 1e-2

    back = tmp_path / "back"
    assert main(["import", str(out), "-o", str(back)]) == 0
    original = load_file(folder / LORA_WEIGHT_NAME)
    imported = load_file(back / LORA_WEIGHT_NAME)
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[k], imported[k]) for k in original)
    assert {k: m.alpha for k, m in modules_of(folder).items()} == {k: m.alpha for k, m in modules_of(back).items()}
    reloaded = fresh_pipeline(tiny_model)
    reloaded.load_lora_weights(str(back))
    for got, want in zip(outputs(reloaded), outputs(pipe)):
        assert (got - want).abs().max().item() < 1e-5
    again = tmp_path / "again.safetensors"  # import kept the base in its sidecar: no --base needed
    assert main(["export", str(back), "-o", str(again)]) == 0
    assert webui.file_sshs_hash(again) == webui.file_sshs_hash(out)  # the very same weights


def test_webui_alpha_is_the_trained_alpha_not_the_rank(trained):
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    _, folder, (unet_state, _) = trained
    modules = modules_of(folder)
    # The older diffusers spelling (`to_q.lora.down`, `lora_linear_layer`) reads the same.
    config = {"r": RANK, "lora_alpha": UNET_ALPHA}
    old_style = webui_convert.modules_from_peft(convert_state_dict_to_diffusers(unet_state), "unet", config)
    assert all(torch.equal(old_style[k].down, modules[k].down) and old_style[k].alpha == modules[k].alpha
               for k in old_style)
    kohya = webui_convert.modules_to_kohya(modules)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1.alpha"
    assert kohya[conv].item() == UNET_ALPHA
    assert kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == TEXT_ALPHA
    by_diffusers = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_state.items()})
    assert by_diffusers[conv].item() == RANK  # the bug this module works around


def test_save_webui_lora_writes_metadata_and_the_a1111_hash(trained, tmp_path):
    pipe, _, (unet_state, text_state) = trained
    meta = webui.training_metadata(base="sd_v1", rank=RANK, lora_alpha=UNET_ALPHA, output_name="sks",
                                   started_at=1.7e9, saved_at=1.7e9 + 60, steps=10, learning_rate=1e-4,
                                   optimizer="AdamW", seed=0, resolution=512, mixed_precision="no",
                                   settings={"noise_offset": 0.1})
    path = tmp_path / "sks.safetensors"
    sshs = webui.save_webui_lora(path, unet_state, None, lora_alpha=UNET_ALPHA, rank=RANK, metadata=meta)
    tensors, header = webui_file.read_lora_file(path)
    assert sshs == header["sshs_model_hash"] == webui.file_sshs_hash(path)
    assert header["ss_noise_offset"] == "0.1" and header["ss_network_alpha"] == "8.0"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert webui_loaders.a1111_sd_version(header) == "SD1"
    assert webui_loaders.a1111_sd_version(webui.training_metadata(base="sd_v2", rank=1, lora_alpha=1, output_name="x")) == "SD2"
    assert all(isinstance(v, str) for v in header.values())
    assert [webui_keys.base_for(768), webui_keys.base_for(1024, "v_prediction"), webui_keys.base_for(8)] == ["sd_v1", "sd_v2_v", None]
    assert len(tensors) == 3 * len(unet_state) // 2  # down, up, alpha per module; no text encoder


def test_every_sd1_module_name_is_in_both_webui_key_maps():
    unet, text = webui_keys.sd_unet_modules(), webui_keys.clip_text_modules(12, 768)
    one = torch.zeros(1, 1)
    modules = {f"unet.{n}": webui_convert.LoraModule(one, one, 1.0) for n in unet}
    modules |= {f"text_encoder.{n}": webui_convert.LoraModule(one, one, 1.0) for n in text}
    keys = webui_convert.modules_to_kohya(modules)
    report = webui_loaders.key_map_report(keys, "sd_v1")
    assert {loader: (matched, len(unmatched)) for loader, (matched, unmatched) in report.items()} == {
        "A1111": (3 * (282 + 72), 0), "ComfyUI/Forge": (3 * (282 + 72), 0)}
    # The LDM names written from the rules are exactly diffusers' modules under A1111's renaming.
    renamed = {webui_keys.a1111_module_name("lora_unet_" + n.replace(".", "_")) for n in unet}
    assert renamed == webui_keys.ldm_unet_modules()
    assert webui_loaders.key_map_report(["lora_unet_down_blocks_9_attentions_0_proj_in.alpha"], "sd_v1")["ComfyUI/Forge"][0] == 0


def test_old_ldm_named_files_import_under_diffusers_names(tmp_path):
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    path = tmp_path / "old.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": down,
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": up,
               "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(1.0)}, path)
    modules = webui_convert.modules_from_kohya(webui_file.read_lora_file(path)[0], path)
    assert list(modules) == ["unet.down_blocks.1.attentions.0.proj_in"]
    assert modules["unet.down_blocks.1.attentions.0.proj_in"].alpha == 1.0


def test_inspect_lists_noise_settings_first(trained, tmp_path, capsys):
    pipe, _, (unet_state, text_state) = trained
    meta = webui.training_metadata(base="sd_v1", rank=RANK, lora_alpha=UNET_ALPHA, output_name="sks",
                                   settings={"noise_offset": 0.1})
    path = tmp_path / "sks.safetensors"
    webui.save_webui_lora(path, unet_state, text_state, lora_alpha=UNET_ALPHA, rank=RANK, metadata=meta)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: kohya" in out and "base: sd_v1 (A1111 files it under SD1)" in out
    assert "(matches the weights)" in out and "A1111:" in out and "ComfyUI/Forge:" in out
    listed = out.split("metadata:")[1].split()
    assert listed[0] == "ss_noise_offset:"


def _evil_pickle(marker) -> bytes:
    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")

    return pickle.dumps(Evil())


@pytest.mark.parametrize("case", ["ckpt", "pickle_named_safetensors", "garbage", "unknown_keys",
                                  "shape_mismatch", "missing", "export_of_kohya", "import_of_diffusers"])
def test_bad_files_get_a_one_line_error_and_exit_2(case, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    path = tmp_path / "lora.safetensors"
    command = "inspect"
    if case == "ckpt":
        path = tmp_path / "lora.ckpt"
        path.write_bytes(_evil_pickle(marker))
    elif case == "pickle_named_safetensors":
        path.write_bytes(_evil_pickle(marker))
    elif case == "garbage":
        path.write_bytes(b"hello, not a tensor file")
    elif case == "unknown_keys":
        save_file({"model.diffusion_model.foo.weight": torch.zeros(2)}, path)
    elif case == "shape_mismatch":
        save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 8),
                   "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 3)}, path)
    elif case == "missing":
        path = tmp_path / "nowhere.safetensors"
    elif case == "export_of_kohya":
        save_file({"lora_unet_conv_in.alpha": torch.tensor(1.0)}, path)
        command = "export"
    elif case == "import_of_diffusers":
        save_file({"unet.conv_in.lora_A.weight": torch.zeros(1, 1)}, path)
        command = "import"
    args = [command, str(path)] + (["-o", str(tmp_path / "out")] if command != "inspect" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert not marker.exists()  # nothing was unpickled
    if "pickle" in case or case == "ckpt":
        assert "pickle" in err


def test_export_without_recorded_alpha_uses_the_flag(trained, tmp_path, capsys):
    _, folder, _ = trained
    tensors = load_file(folder / LORA_WEIGHT_NAME)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(tensors, bare / LORA_WEIGHT_NAME)  # no lora_adapter_metadata
    assert main(["export", str(bare), "-o", str(tmp_path / "a.safetensors"), "--base", "sd_v1"]) == 0
    assert "assuming alpha = rank" in capsys.readouterr().err
    assert load_file(tmp_path / "a.safetensors")["lora_unet_conv_out.alpha"].item() == RANK
    assert main(["export", str(bare), "-o", str(tmp_path / "b.safetensors"), "--base", "sd_v1", "--lora_alpha", "8"]) == 0
    assert load_file(tmp_path / "b.safetensors")["lora_unet_conv_out.alpha"].item() == 8
    assert main(["export", str(bare), "-o", str(tmp_path / "c.safetensors")]) == 2  # tiny model: base unknown


def test_the_schemas_choices_name_what_the_webui_code_knows():
    from dreambooth_offset.config.commands import EXPORT_DTYPES, WEBUI_BASES

    assert WEBUI_BASES == tuple(webui_keys.BASES)
    assert EXPORT_DTYPES == tuple(webui_convert.DTYPES)

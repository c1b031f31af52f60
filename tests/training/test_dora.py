"""--use_dora: peft's DoRA on attention and conv targets. The diffusers file loads with
load_lora_weights and reproduces the trained models; the WebUI file holds each trained weight as
LyCORIS's output-axis DoRA (`dora_scale` (out, 1[, 1, 1]) = the merged weight's row norms) and
imports back bit for bit."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_offset.cli import main
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.network_weights import load_network_weights
from dreambooth_offset.training.train import train
from dreambooth_offset.webui import convert, lora_file
from dreambooth_offset.webui.loaders import key_map_report
from tests.tiny import overrides

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@pytest.fixture(scope="module")
def dora_run(sd1_model, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "out"
    result = train(overrides(sd1_model, instance_dir, out, use_dora=True, unet_target_modules=list(TARGETS),
                             train_text_encoder=True, lora_alpha=8, output_name="sks", optimizer="adamw"))
    return result, out


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_magnitude_vector")
            and "default" in m.lora_magnitude_vector}


def merged_weight(layer) -> torch.Tensor:
    """The weight the trained layer computes with: peft's own merge, on a copy."""
    layer = copy.deepcopy(layer)
    layer.merge()
    return layer.base_layer.weight.detach()


def unet_inputs(unet):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return (torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))


def test_dora_trains_magnitudes_and_the_diffusers_file_reproduces_the_models(dora_run, sd1_model):
    from diffusers import StableDiffusionPipeline

    result, out = dora_run
    unet, text_encoder = result.unet.eval(), result.text_encoders[0].eval()
    layers = lora_layers(unet)
    assert any(isinstance(m.base_layer, torch.nn.Conv2d) for m in layers.values())
    moved = [n for n, m in layers.items()
             if not torch.allclose(m.lora_magnitude_vector["default"].weight.flatten(),
                                   m.base_layer.weight.flatten(1).norm(dim=1))]
    assert moved, "no DoRA magnitude trained"
    state = load_file(result.lora_path)
    assert sum(k.endswith("lora_magnitude_vector") for k in state) == len(layers)
    assert any(k.startswith("text_encoder.") and k.endswith("lora_magnitude_vector.weight") for k in state)

    pipe = StableDiffusionPipeline.from_pretrained(sd1_model, safety_checker=None)
    pipe.load_lora_weights(out)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*unet_inputs(unet)).sample, unet(*unet_inputs(unet)).sample,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.text_encoder(ids)[0], text_encoder(ids)[0], atol=1e-5, rtol=1e-5)


def test_the_webui_file_is_lycoris_output_axis_dora_of_the_trained_weights(dora_run):
    result, out = dora_run
    tensors, header = lora_file.read_lora_file(out / "sks.safetensors")
    assert header["ss_network_args"] == '{"dora_wd": "True", "wd_on_out": "True"}'
    modules = convert.modules_from_kohya(tensors, "sks")
    for path, layer in lora_layers(result.unet).items():
        name = convert.modules_to_kohya({f"unet.{path}": modules[f"unet.{path}"]}).popitem()[0].split(".")[0]
        scale, down, up = tensors[f"{name}.dora_scale"], tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        w = layer.base_layer.weight.detach()
        assert scale.shape == (w.shape[0], *[1] * (w.ndim - 1))  # the output axis, as ComfyUI/Forge tell it apart
        # LyCORIS's wd_on_out reading: W' = dora_scale * V / ||V|| per output row, V = W + up @ down * alpha / rank
        v = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * float(tensors[f"{name}.alpha"]) / down.shape[0]
        rebuilt = scale * v / v.flatten(1).norm(dim=1).reshape(scale.shape)
        torch.testing.assert_close(rebuilt, merged_weight(layer), atol=1e-6, rtol=1e-5)
    # A1111 reads dora_scale per input column only: the report says so instead of calling it a match
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    report = key_map_report([f"{name}.{part}" for part in convert.KOHYA_PARTS], "sd_v1")
    assert report == {"A1111": (3, [f"{name}.dora_scale"]), "ComfyUI/Forge": (4, [])}


def test_export_then_import_is_bit_exact_and_loads_the_trained_model(dora_run, sd1_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    result, out = dora_run
    assert main(["export", str(out), "-o", str(tmp_path / "webui.safetensors")]) == 0
    assert main(["import", str(tmp_path / "webui.safetensors"), "-o", str(tmp_path / "back")]) == 0
    trained, back = load_file(result.lora_path), load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert trained.keys() == back.keys() and all(torch.equal(trained[k], back[k]) for k in trained)
    pipe = StableDiffusionPipeline.from_pretrained(sd1_model, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*unet_inputs(pipe.unet)).sample,
                                   result.unet(*unet_inputs(pipe.unet)).sample, atol=1e-5, rtol=1e-5)


def test_an_input_axis_dora_file_and_a_dora_mismatch_are_refused(dora_run, tmp_path):
    result, out = dora_run
    tensors, _ = lora_file.read_lora_file(out / "sks.safetensors")
    name = next(k for k in tensors if k.endswith("attn1_to_q.dora_scale"))
    width = tensors[name.replace("dora_scale", "lora_down.weight")].shape[1]
    save_file({**tensors, name: torch.ones(1, width)}, tmp_path / "input_axis.safetensors")
    with pytest.raises(UsageError, match="input-axis"):
        lora_file.read_modules(tmp_path / "input_axis.safetensors")

    plain = copy.deepcopy(result.unet)
    plain.delete_adapters("default")
    from dreambooth_offset.config import AdapterConfig
    from dreambooth_offset.training.lora import add_adapters

    cfg = AdapterConfig(unet_target_modules=TARGETS, lora_alpha=8)
    add_adapters(plain, cfg)
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, tmp_path / "unet.safetensors")
    with pytest.raises(UsageError, match="DoRA in the file and plain LoRA in this run"):
        load_network_weights(str(tmp_path / "unet.safetensors"), cfg, {"unet": plain})

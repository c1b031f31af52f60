"""--network_type loha / lokr: peft's LoHa and LoKr train through the same loop, and the WebUI
file in LyCORIS's keys makes every WebUI loader compute the trained update (their published
formulas, restated here), LoKr's both-factors-full case included; resume is bit-exact."""

import pytest
import torch

from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.train import train
from dreambooth_offset.webui.convert import kohya_name
from dreambooth_offset.webui.lora_file import read_lora_file
from tests.tiny import assert_resume_is_bit_exact, overrides

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def factor(parts, n):
    """A LoKr factor as the loaders rebuild it: the full matrix, or `_a @ _b`."""
    return parts[f"lokr_w{n}"] if f"lokr_w{n}" in parts else parts[f"lokr_w{n}_a"] @ parts[f"lokr_w{n}_b"]


def loader_update(parts: dict, shape) -> torch.Tensor:
    """The update A1111 / ComfyUI / Forge build from one module's LyCORIS keys (network_hada.py,
    network_lokr.py, comfy/weight_adapter/{loha,lokr}.py): product, then alpha / dim, where dim is
    the rank of a decomposed factor and LoKr with both factors full takes no scale."""
    alpha = float(parts["alpha"])
    if "hada_w1_a" in parts:
        delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        scale = alpha / parts["hada_w1_b"].shape[0]
    else:
        w1, w2 = factor(parts, 1), factor(parts, 2)
        delta = torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)  # a conv's w2 keeps its kernel
        dim = next((parts[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)
        scale = 1.0 if dim is None else alpha / dim
    return delta.reshape(shape) * scale


@pytest.mark.parametrize("network_type, rank", [("loha", 2), ("lokr", 1), ("lokr", 4)])
def test_the_webui_file_gives_the_trained_update(sd1_model, instance_dir, tmp_path, network_type, rank):
    result = train(overrides(sd1_model, instance_dir, tmp_path / "out", network_type=network_type, rank=rank,
                             lora_alpha=8, unet_target_modules=TARGETS, train_text_encoder=True, output_name="sks",
                             optimizer="adamw"))
    assert result.lora_path.name == f"pytorch_{network_type}_weights.safetensors"
    tensors, header = read_lora_file(tmp_path / "out" / "sks.safetensors")
    assert header["ss_network_module"] == "lycoris.kohya" and network_type in header["ss_network_args"]
    layers = {f"unet.{n}": m for n, m in result.unet.named_modules() if hasattr(m, "get_delta_weight")
              and hasattr(m, "base_layer")}
    layers |= {f"text_encoder.text_model.{n.removeprefix('text_model.')}": m
               for n, m in result.text_encoders[0].named_modules() if hasattr(m, "get_delta_weight")
               and hasattr(m, "base_layer")}
    assert any(isinstance(m.base_layer, torch.nn.Conv2d) for m in layers.values())
    both_full = 0
    for key, layer in layers.items():
        name = kohya_name(key)
        parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
        both_full += {"lokr_w1", "lokr_w2"} <= set(parts)
        trained = layer.get_delta_weight("default").detach()
        assert trained.abs().max() > 0, f"{key} did not train"
        torch.testing.assert_close(loader_update(parts, trained.shape), trained, rtol=1e-5, atol=1e-7)
    assert len(layers) == len({k.split(".", 1)[0] for k in tensors})  # every module, nothing else
    if network_type == "lokr":
        assert (both_full > 0) == (rank == 4)  # rank 4 makes both factors full on these widths


def test_resume_with_loha_is_bit_exact(tiny_model, instance_dir, tmp_path):
    a = assert_resume_is_bit_exact(tiny_model, instance_dir, tmp_path, "pytorch_loha_weights.safetensors",
                                   network_type="loha", rank=2, max_train_steps=4, checkpointing_steps=2,
                                   train_text_encoder=True, seed=5)
    assert any(k.startswith("text_encoder.") for k in a) and all(".hada_" in k for k in a)


def test_lora_only_options_are_refused(tiny_model, instance_dir, tmp_path):
    with pytest.raises(UsageError, match="use_dora with network_type = 'loha'"):
        overrides(tiny_model, instance_dir, tmp_path, network_type="loha", use_dora=True)
    with pytest.raises(UsageError, match="--loraplus_lr_ratio with --network_type lokr"):
        train(overrides(tiny_model, instance_dir, tmp_path / "out", network_type="lokr", loraplus_lr_ratio=4.0))

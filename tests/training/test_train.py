"""The trainer end to end through the real CLI, on a tiny in-process Stable Diffusion folder."""
import shutil

import torch
from safetensors.torch import load_file

from dreambooth_offset.cli import main
from dreambooth_offset.training.train import train
from tests.tiny import flags, overrides


def unet_inputs(unet):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return (torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))


def test_lora_file_loads_in_diffusers_and_matches_trained_unet(tiny_model, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft  # noqa: F401  (diffusers API present)

    result = train(overrides(tiny_model, instance_dir, tmp_path / "out", lora_alpha=8, rank=4,
                             unet_target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_out", "conv1"]))
    assert result.lora_path.name == "pytorch_lora_weights.safetensors" and result.lora_path.is_file()
    assert (tmp_path / "out" / "training_config.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    x, t, ctx = unet_inputs(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(tmp_path / "out")
        loaded = pipe.unet(x, t, ctx).sample
        trained = result.unet.eval()(x, t, ctx).sample
    assert (loaded - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_only_lora_parameters_change(tiny_model, instance_dir, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    result = train(overrides(tiny_model, instance_dir, tmp_path / "out", train_text_encoder=True))
    for trained, cls, sub in ((result.unet, UNet2DConditionModel, "unet"),
                              (result.text_encoders[0], CLIPTextModel, "text_encoder"),
                              (result.parts.vae, AutoencoderKL, "vae")):
        base = cls.from_pretrained(tiny_model, subfolder=sub).state_dict()
        lora_changed = 0
        for name, value in trained.state_dict().items():
            if "lora_" in name:
                lora_changed += int("lora_B" in name and value.abs().sum() > 0)
                continue
            key = name.replace(".base_layer", "")
            assert torch.equal(value, base[key]), f"{sub}.{key} changed"
        assert lora_changed > 0 or sub == "vae"


def test_same_seed_gives_identical_lora_and_resume_equals_uninterrupted(tiny_model, instance_dir, tmp_path):
    common = dict(max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, random_flip=True,
                  lr_scheduler="linear", lr_warmup_steps=2, optimizer="adamw8bit", lora_dropout=0.1, seed=5)
    assert main(flags(tiny_model, instance_dir, tmp_path / "a", **common)) == 0
    assert main(flags(tiny_model, instance_dir, tmp_path / "b", **common)) == 0
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "c" / "checkpoint-3")
    assert main(flags(tiny_model, instance_dir, tmp_path / "c", resume_from_checkpoint="latest", **common)) == 0
    c = load_file(tmp_path / "c" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a), "resumed run differs from the uninterrupted one"
    mid = load_file(tmp_path / "a" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # training went on after the checkpoint


def test_checkpoints_total_limit_keeps_the_newest(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=5, checkpointing_steps=1,
                      checkpoints_total_limit=2, optimizer="adamw")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_prior_preservation_generates_class_images(tiny_model, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    argv = flags(tiny_model, instance_dir, tmp_path / "out", with_prior_preservation=True, class_data_dir=class_dir,
                 class_prompt="a photo of dog", num_class_images=3, num_inference_steps=2, sample_batch_size=2,
                 max_train_steps=2)
    assert main(argv) == 0
    assert len(list(class_dir.glob("*.png"))) == 3
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_sidecar_captions_condition_their_own_images(tiny_model, tmp_path):
    from dreambooth_offset.training.family import encode_prompts, tokenize
    from dreambooth_offset.training.prepare import prepare
    from tests.tiny import write_images

    data = write_images(tmp_path / "data", [(200, 80, 40), (40, 90, 220)])
    (data / "img0.txt").write_text("a photo of sks cat")
    cfg = overrides(tiny_model, data, tmp_path / "out", caption_extension=".txt")
    prepared = prepare(cfg)
    batch = prepared.batches(0, torch.Generator().manual_seed(0))  # batch 2 of 2 images: each once
    tokenizer, text_encoder = prepared.parts.tokenizer, prepared.parts.text_encoder
    expected = tokenize([tokenizer], ["a photo of sks cat", "a photo of sks dog"])
    assert sorted(map(tuple, batch.input_ids.tolist())) == sorted(map(tuple, expected.tolist()))
    with torch.no_grad():
        assert torch.allclose(batch.conditioning.context, encode_prompts([text_encoder], batch.input_ids).context,
                              atol=1e-6)


def test_text_encoder_lora_is_saved_and_loads(tiny_model, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(overrides(tiny_model, instance_dir, tmp_path / "out", train_text_encoder=True))
    state = load_file(result.lora_path)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "out")
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], result.text_encoders[0].eval()(ids)[0], atol=1e-5, rtol=1e-5)


def test_adapter_metadata_holds_only_set_fields_so_an_older_peft_loads_the_file(tiny_model, instance_dir, tmp_path):
    # diffusers loads a file with LoraConfig(**metadata); a field an older peft does not know stops
    # it even when unset (peft 0.22's astra_config = None under peft 0.21), so unset fields stay out
    import json

    from peft import LoraConfig
    from safetensors import safe_open

    from dreambooth_offset.training.lora import CORE_ADAPTER_KEYS

    result = train(overrides(tiny_model, instance_dir, tmp_path / "out", train_text_encoder=True, rank=2))
    with safe_open(result.lora_path, "pt") as f:
        flat = json.loads(f.metadata()["lora_adapter_metadata"])
    defaults = LoraConfig().to_dict()
    for component in ("unet", "text_encoder"):
        meta = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(component + ".")}
        odd = {k: v for k, v in meta.items() if k not in CORE_ADAPTER_KEYS and k in defaults and v == defaults[k]}
        assert not odd and meta["r"] == 2 and meta["target_modules"], (component, odd, meta)
        assert LoraConfig(**meta).r == 2


def test_optimizer_states(tiny_model, instance_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from dreambooth_offset.config import AdapterConfig, OptimConfig
    from dreambooth_offset.training.lora import add_adapters, trainable_parameters
    from dreambooth_offset.training.optim import MIN_8BIT_SIZE, make_optimizer

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet.requires_grad_(False)
    add_adapters(unet, AdapterConfig(rank=64, unet_target_modules=("conv1", "conv2", "to_q")))
    params = trainable_parameters(unet)
    for name, dtype in (("adamw8bit", torch.uint8), ("adamw", torch.float32)):
        opt = make_optimizer(params, OptimConfig(optimizer=name))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        moments = [v for p in params if p.numel() >= MIN_8BIT_SIZE
                   for k, v in opt.state[p].items() if k in ("state1", "state2", "exp_avg", "exp_avg_sq")]
        assert moments and all(v.dtype == dtype for v in moments), name


def test_adamw_is_fused_on_the_cpu_and_steps_like_the_reference():
    from dreambooth_offset.config import OptimConfig
    from dreambooth_offset.training.optim import make_optimizer

    g = torch.Generator().manual_seed(0)
    fused = [torch.nn.Parameter(torch.randn(n, 3, generator=g)) for n in (4, 64)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    opt = make_optimizer(fused, OptimConfig(optimizer="adamw", learning_rate=0.1))
    ref = torch.optim.AdamW(plain, lr=0.1, weight_decay=opt.defaults["weight_decay"], eps=opt.defaults["eps"],
                            betas=opt.defaults["betas"], foreach=False)
    assert opt.defaults["fused"]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in fused]
        for ps in (fused, plain):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(flags(tiny_model, instance_dir, out, learning_rate=1e30, max_grad_norm=0, optimizer="adamw",
                      checkpointing_steps=1, max_train_steps=50))
    err = capsys.readouterr().err
    assert code == 1
    assert "at step" in err and "Last good checkpoint" in err
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    ckpts = list(out.glob("checkpoint-*"))
    assert ckpts and all((c / "pytorch_lora_weights.safetensors").is_file() for c in ckpts)
    assert str(sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))[-1]) in err


def test_webui_file_written_at_end_and_at_checkpoints(tmp_path, instance_dir):
    from safetensors import safe_open

    from tests.tiny import build_pipeline_folder

    sd1_shaped = build_pipeline_folder(tmp_path / "sd1", cross_attention_dim=768)
    out = tmp_path / "my-run"
    assert main(flags(sd1_shaped, instance_dir, out, max_train_steps=3, checkpointing_steps=2, optimizer="adamw",
                      noise_offset=0.07)) == 0
    for path in (out / "my-run.safetensors", out / "checkpoint-2" / "my-run.safetensors"):
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            assert any(k.startswith("lora_unet_") for k in f.keys())
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_noise_offset"] == "0.07"
    with safe_open(out / "my-run.safetensors", "pt") as f:
        assert f.metadata()["ss_steps"] == "3"


def test_bf16_with_gradient_checkpointing_keeps_lora_fp32(tiny_model, instance_dir, tmp_path):
    result = train(overrides(tiny_model, instance_dir, tmp_path / "out", mixed_precision="bf16",
                             gradient_checkpointing=True, train_text_encoder=True, max_train_steps=2))
    lora = {n: p for n, p in result.unet.named_parameters() if "lora_" in n}
    frozen = [p for n, p in result.unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    assert {v.dtype for v in load_file(result.lora_path).values()} == {torch.float32}


def test_missing_bitsandbytes_stops_and_names_adamw(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    code = main(flags(tiny_model, instance_dir, tmp_path / "out", optimizer="adamw8bit"))
    err = capsys.readouterr().err
    assert code == 2 and "--optimizer adamw" in err and "bitsandbytes" in err
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_shared_files_carry_no_local_path(sd1_model, instance_dir, tmp_path):
    """ss_sd_model_name holds the model folder's own name; no metadata value of either LoRA file
    (nor the WebUI file of a checkpoint) names a folder of this machine."""
    from safetensors import safe_open

    out = tmp_path / "private"
    assert main(flags(sd1_model, instance_dir, out, max_train_steps=2, checkpointing_steps=1,
                      optimizer="adamw")) == 0
    files = [out / "pytorch_lora_weights.safetensors", out / "private.safetensors",
             out / "checkpoint-1" / "private.safetensors"]
    for path in files:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        assert metadata, path
        for key, value in metadata.items():
            assert str(tmp_path) not in value and not value.startswith("/"), f"{path.name}: {key} = {value!r}"
    with safe_open(files[1], "pt") as f:
        assert f.metadata()["ss_sd_model_name"] == sd1_model.name

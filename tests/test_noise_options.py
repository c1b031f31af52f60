"""The noise toolbox (issue 5): contradictions, `auto`, metadata, and a short CLI run per option."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import safe_open

from dreambooth_offset.cli import main
from dreambooth_offset.config import load_config
from dreambooth_offset.errors import UsageError
from dreambooth_offset.models import training_scheduler
from dreambooth_offset.noise_auto import (
    AUTO_CAP, RECORD_NAME, auto_offset, latent_channel_means, leak_gap, resolve_auto_offset,
)
from dreambooth_offset.sample import sampler_overrides
from tests.test_train import flags

# SD 1.x: scaled_linear 0.00085 -> 0.012 over 1000 steps; SCIENCE.md section 2.
SD = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
A_T, S_T = SD.alphas_cumprod[-1].sqrt().item(), (1 - SD.alphas_cumprod[-1]).sqrt().item()


# --- contradictions fail early, naming the keys ---------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"multires_noise_iterations": 6}, "pass --noise_offset 0 explicitly"),
    ({"multires_noise_iterations": 6, "noise_offset": "auto"}, "multires_noise_iterations"),
    ({"zero_terminal_snr": True}, "zero_terminal_snr needs prediction_type = 'v_prediction'"),
    ({"zero_terminal_snr": True, "prediction_type": "epsilon"}, "divides by a_T = 0"),
    ({"noise_offset_probability": 1.5}, "noise_offset_probability = 1.5: it must be in [0, 1]"),
    ({"noise_offset_probability": -0.1}, "noise_offset_probability"),
    ({"noise_offset": -0.1}, "noise_offset = -0.1: it must be >= 0"),
    ({"noise_offset": "bright"}, "noise_offset must be float or 'auto'"),
    ({"ip_noise_gamma": -0.1}, "ip_noise_gamma = -0.1"),
    ({"noise_offset_schedule": "linear", "noise_offset_end": -1.0}, "noise_offset_end = -1.0"),
    ({"noise_offset_end": 0.0}, "noise_offset_end is set but noise_offset_schedule is 'constant'"),
    ({"noise_offset_schedule": "cosine"}, "noise_offset_schedule = 'cosine' needs noise_offset_end"),
    ({"noise_offset": 0.0, "noise_offset_random_strength": True}, "noise_offset_random_strength"),
    ({"noise_offset": 0.0, "adaptive_noise_scale": 0.05}, "adaptive_noise_scale"),
    ({"noise_offset": 0.0, "noise_offset_variance_preserving": True}, "noise_offset_variance_preserving"),
    ({"ip_noise_gamma_random_strength": True}, "ip_noise_gamma_random_strength needs ip_noise_gamma"),
    ({"multires_noise_iterations": 4, "noise_offset": 0.0, "multires_noise_discount": 0.0}, "multires_noise_discount"),
    ({"snr_gamma": 0.0}, "snr_gamma"),
    ({"loss_type": "l1"}, "loss_type = 'l1' is not one of"),
    ({"huber_c": 0.0}, "huber_c"),
    ({"guidance_rescale": 1.5}, "guidance_rescale"),
    ({"prediction_type": "sample"}, "prediction_type = 'sample' is not one of"),
])
def test_contradictions_name_the_keys(values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")
                       .replace("]", r"\]")):
        load_config(None, values)


def test_valid_combinations_load_and_round_trip(tmp_path):
    cfg = load_config(None, {"noise_offset": "auto", "noise_offset_random_strength": True, "adaptive_noise_scale": -0.1,
                             "noise_offset_probability": 0.5, "noise_offset_variance_preserving": True,
                             "noise_offset_schedule": "linear", "noise_offset_end": 0.0, "ip_noise_gamma": 0.1,
                             "zero_terminal_snr": True, "prediction_type": "v_prediction", "snr_gamma": 5,
                             "loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2})
    assert cfg.noise.noise_offset == "auto" and cfg.loss.snr_gamma == 5.0
    assert load_config(None, cfg.to_dict()) == cfg
    path = tmp_path / "run.toml"
    path.write_text('noise_offset = "auto"\nmultires_noise_iterations = 0\n')
    assert load_config(path).noise.noise_offset == "auto"
    pyramid = load_config(None, {"noise_offset": 0, "multires_noise_iterations": 6})
    assert pyramid.noise.noise_offset == 0.0 and pyramid.noise.multires_noise_iterations == 6


def test_cli_refuses_before_any_model_loads(tmp_path, capsys):
    """The model folder does not exist: the message names the noise keys, not the model."""
    out = tmp_path / "out"
    argv = flags(tmp_path / "no-model", tmp_path / "no-images", out, multires_noise_iterations=6)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "multires_noise_iterations" in err and "--noise_offset 0" in err and len(err.splitlines()) == 1
    assert main(flags(tmp_path / "no-model", tmp_path / "no-images", out, zero_terminal_snr=True)) == 2
    assert "v_prediction" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(flags(tmp_path / "no-model", tmp_path / "no-images", out, noise_offset="bright"))
    assert exc.value.code == 2


# --- noise_offset auto ---------------------------------------------------------------------------

def test_auto_offset_formula_matches_the_science_table():
    """SCIENCE.md section 2, m = 1 (a black image) at 64 x 64: z = 4.38 without offset, 0.68 at 0.1."""
    n = 64 * 64
    assert leak_gap(1.0, n, A_T, S_T, 0.0) == pytest.approx(4.38, abs=0.01)
    assert leak_gap(1.0, n, A_T, S_T, 0.1) == pytest.approx(0.68, abs=0.01)
    black = auto_offset(torch.tensor([[-1.0, 0.2, 0.1, -0.3]]), n, A_T, S_T)
    assert black.worst_channel_mean == -1.0 and black.z_before == pytest.approx(4.38, abs=0.01)
    assert black.z_after == pytest.approx(1.0) and not black.capped
    assert black.offset == pytest.approx(((A_T / S_T) ** 2 - 1 / n) ** 0.5)  # 0.0666
    # the smallest such o: a hair less leaves z above 1
    assert leak_gap(1.0, n, A_T, S_T, black.offset * 0.99) > 1.0
    grey = auto_offset(torch.tensor([[0.05, -0.02, 0.03, 0.0]]), n, A_T, S_T)
    assert grey.offset == 0.0 and grey.z_after < 1.0 < black.z_before
    # the gap grows with N, so does the chosen offset
    assert auto_offset(torch.tensor([1.0]), 128 * 128, A_T, S_T).offset > black.offset
    assert auto_offset(torch.tensor([1.0]), 8 * 8, A_T, S_T).offset == 0.0  # z = 0.55 already


def test_auto_offset_is_zero_when_the_means_match_the_inference_start():
    """Latent means at the level of the inference start's own spread (1/sqrt(N)) or under zero
    terminal SNR (a_T = 0): nothing to close."""
    n = 64 * 64
    start_like = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) / n**0.5
    assert auto_offset(start_like, n, A_T, S_T).offset == 0.0
    ztsnr = auto_offset(torch.tensor([3.0]), n, 0.0, 1.0)
    assert ztsnr.offset == 0.0 and ztsnr.z_before == 0.0


def test_auto_offset_caps():
    extreme = auto_offset(torch.tensor([10.0]), 64 * 64, A_T, S_T)
    assert extreme.offset == AUTO_CAP and extreme.capped and extreme.z_after > 1.0
    assert auto_offset(torch.tensor([10.0]), 64 * 64, A_T, S_T, cap=1.0).offset == pytest.approx(0.684, abs=1e-3)


class PoolVAE(torch.nn.Module):
    """A stand-in VAE whose posterior mean is the pixels average-pooled by 2 (plus a zero fourth
    channel): latent channel means are the image's own mean colour in [-1, 1]."""

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)
    dtype, device = torch.float32, torch.device("cpu")

    def encode(self, pixels):
        mean = F.avg_pool2d(pixels, 2)
        mean = torch.cat([mean, torch.zeros_like(mean[:, :1])], dim=1)
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -20)], 1)))


def _solid(value, size=64):
    return torch.full((3, size, size), value, dtype=torch.uint8)


def test_auto_measures_the_images_and_picks_more_for_black_than_grey():
    vae, res = PoolVAE(), 64  # latents 32 x 32: N = 1024, where SD's schedule leaks (z = 2.19 at m = 1)
    means, n = latent_channel_means(vae, [_solid(0), _solid(128)], res)
    assert n == 32 * 32
    torch.testing.assert_close(means[0], torch.tensor([-1.0, -1.0, -1.0, 0.0]))
    base = load_config(None, {"noise_offset": "auto", "resolution": res, "noise_offset_random_strength": True})
    black_cfg, black, _ = resolve_auto_offset(base, vae, SD, {"instance": [_solid(0)]})
    grey_cfg, grey, _ = resolve_auto_offset(base, vae, SD, {"instance": [_solid(128)]})
    assert black.offset > 0.05 and black.z_before == pytest.approx(2.19, abs=0.01) and black.z_after == pytest.approx(1.0)
    assert grey.offset == 0.0 and grey.z_before < 0.01
    assert black_cfg.noise.noise_offset == black.offset and black_cfg.noise.noise_offset_random_strength
    # resolved to 0: the offset modifiers have nothing to modify and are dropped from the config
    assert grey_cfg.noise.noise_offset == 0.0 and not grey_cfg.noise.noise_offset_random_strength
    # class images count too: a white class image is as extreme as a black instance image
    both, mixed, _ = resolve_auto_offset(base, vae, SD, {"instance": [_solid(128)], "class": [_solid(255)]})
    assert mixed.offset == pytest.approx(black.offset) and mixed.worst_channel_mean == pytest.approx(1.0)
    same, none, _ = resolve_auto_offset(load_config(None, {"noise_offset": 0.05}), vae, SD, {"instance": [_solid(0)]})
    assert none is None and same.noise.noise_offset == 0.05


# --- sampling under zero terminal SNR ---------------------------------------------------------

def test_zero_terminal_snr_samples_from_t_equals_T():
    ztsnr = training_scheduler(SD.config, zero_terminal_snr=True, prediction_type="v_prediction")
    assert sampler_overrides(SD.config) == {}
    leading = DDIMScheduler.from_config(SD.config, steps_offset=1)
    trailing = DDIMScheduler.from_config(ztsnr.config, **sampler_overrides(ztsnr.config))
    leading.set_timesteps(50)
    trailing.set_timesteps(50)
    assert leading.timesteps[0].item() == 981 and trailing.timesteps[0].item() == 999
    assert trailing.alphas_cumprod[-1].item() == 0.0 and trailing.config.prediction_type == "v_prediction"


# --- train_step: input perturbation moves the input, never the target ------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_train_step_perturbs_the_input_and_regresses_on_the_clean_noise(prediction_type):
    from dreambooth_offset.batches import Batch
    from dreambooth_offset.train import train_step

    seen = {}

    class Probe(torch.nn.Module):  # a UNet that records its input and predicts 0
        def forward(self, sample, timesteps, context):
            seen["sample"], seen["timesteps"] = sample, timesteps
            return SimpleNamespace(sample=torch.zeros_like(sample))

    sched = training_scheduler(SD.config, prediction_type=prediction_type)
    cfg = load_config(None, {"noise_offset": 0.0, "ip_noise_gamma": 0.5, "max_train_steps": 1})
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents, torch.zeros(2, 77, dtype=torch.long), torch.zeros(2, 77, 8), 2)
    loss = train_step(Probe(), None, sched, batch, cfg, torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(0)  # the same stream: noise, timesteps, then the perturbation
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    extra = torch.randn(latents.shape, generator=g)
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["sample"], sched.add_noise(latents, noise + 0.5 * extra, timesteps))
    clean_target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss.total, clean_target.pow(2).mean())


# --- a short training run per option, through the CLI ------------------------------------------

RUNS = {
    "random_strength": {"noise_offset_random_strength": True},
    "adaptive": {"adaptive_noise_scale": 0.05},
    "probability": {"noise_offset_probability": 0.5},
    "variance_preserving": {"noise_offset_variance_preserving": True},
    "linear_schedule": {"noise_offset_schedule": "linear", "noise_offset_end": 0.0},
    "cosine_schedule": {"noise_offset": 0.0, "noise_offset_schedule": "cosine", "noise_offset_end": 0.1},
    "pyramid": {"noise_offset": 0.0, "multires_noise_iterations": 6, "multires_noise_discount": 0.3},
    "input_perturbation": {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
    "min_snr_epsilon": {"snr_gamma": 5.0},
    "huber": {"loss_type": "huber", "huber_schedule": "snr"},
    "smooth_l1": {"loss_type": "smooth_l1", "huber_schedule": "exponential"},
    "auto": {"noise_offset": "auto"},
    "zero_terminal_snr": {"zero_terminal_snr": True, "prediction_type": "v_prediction", "snr_gamma": 5.0,
                          "validation_prompt": "a photo of sks dog", "num_validation_images": 1,
                          "num_inference_steps": 2, "validation_steps": 2},
}


@pytest.mark.parametrize("name", RUNS)
def test_each_option_trains_through_the_cli(name, tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=2, optimizer="adamw", **RUNS[name])) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((out / "training_config.json").read_text())
    for key, value in RUNS[name].items():
        if key != "noise_offset" or value != "auto":
            assert saved[key] == (list(value) if isinstance(value, tuple) else value) or saved[key] == [value], key
    if name == "auto":
        record = json.loads((out / RECORD_NAME).read_text())
        assert isinstance(saved["noise_offset"], float) and saved["noise_offset"] == record["offset"]
        assert {"z_before", "z_after", "worst_channel_mean", "latent_pixels", "channel_means"} <= record.keys()
        assert len(record["channel_means"]) == 3  # one row per instance image
    if name == "zero_terminal_snr":
        assert list((out / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def sd1_model(tmp_path_factory):
    from tests.tiny import build_pipeline_folder

    return build_pipeline_folder(tmp_path_factory.mktemp("sd1"), cross_attention_dim=768)


def _metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_webui_metadata_records_every_noise_setting(sd1_model, instance_dir, tmp_path):
    out = tmp_path / "run-a"
    assert main(flags(sd1_model, instance_dir, out, max_train_steps=1, optimizer="adamw", noise_offset="auto",
                      noise_offset_random_strength=True, adaptive_noise_scale=0.05, noise_offset_probability=0.5,
                      noise_offset_variance_preserving=True, noise_offset_schedule="linear", noise_offset_end=0.02,
                      ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, snr_gamma=5, loss_type="huber",
                      huber_c=0.2)) == 0
    meta = _metadata(out / "run-a.safetensors")
    record = json.loads((out / RECORD_NAME).read_text())
    assert float(meta["ss_noise_offset"]) == pytest.approx(record["offset"])  # the resolved number, not "auto"
    assert json.loads(meta["ss_noise_offset_auto"])["z_after"] == pytest.approx(record["z_after"])
    expected = {  # kohya's names (sd-scripts train_network.py) and ours as ss_noise_offset_*
        "ss_noise_offset_random_strength": "True", "ss_adaptive_noise_scale": "0.05",
        "ss_noise_offset_probability": "0.5", "ss_noise_offset_variance_preserving": "True",
        "ss_noise_offset_schedule": "linear", "ss_noise_offset_end": "0.02", "ss_ip_noise_gamma": "0.1",
        "ss_ip_noise_gamma_random_strength": "True", "ss_min_snr_gamma": "5.0", "ss_loss_type": "huber",
        "ss_huber_c": "0.2", "ss_huber_schedule": "snr", "ss_zero_terminal_snr": "False",
        "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3", "ss_prediction_type": "epsilon",
    }
    assert {k: meta.get(k) for k in expected} == expected

    out = tmp_path / "run-b"
    assert main(flags(sd1_model, instance_dir, out, max_train_steps=1, optimizer="adamw", noise_offset=0,
                      multires_noise_iterations=6, zero_terminal_snr=True, prediction_type="v_prediction")) == 0
    meta = _metadata(out / "run-b.safetensors")
    assert meta["ss_multires_noise_iterations"] == "6" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["ss_noise_offset"] == "0.0" and meta["ss_prediction_type"] == "v_prediction"
    assert "ss_noise_offset_auto" not in meta


def test_generate_samples_a_zero_terminal_snr_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "gen"
    common = ["generate", "--pretrained_model_name_or_path", str(tiny_model), "--prompt", "a photo of sks dog",
              "--num_images", "1", "--num_inference_steps", "2", "--output_dir", str(out)]
    assert main(common + ["--zero_terminal_snr"]) == 2
    assert "v_prediction" in capsys.readouterr().err
    assert main(common + ["--zero_terminal_snr", "--prediction_type", "v_prediction"]) == 0
    assert (out / "stats.json").is_file()


def test_class_images_come_from_the_base_scheduler_under_zero_terminal_snr(tiny_model, instance_dir, tmp_path,
                                                                            monkeypatch):
    """The base model was not trained for rescaled betas or v-prediction: it must sample its class
    images with its own scheduler, and only training uses the adjusted one."""
    from dreambooth_offset import prior

    seen = []
    original = prior.ensure_class_images

    def spy(parts, cfg, accelerator):
        seen.append(dict(parts.noise_scheduler.config))
        return original(parts, cfg, accelerator)

    monkeypatch.setattr(prior, "ensure_class_images", spy)
    out = tmp_path / "out"
    assert main(flags(tiny_model, instance_dir, out, max_train_steps=1, optimizer="adamw", zero_terminal_snr=True,
                      prediction_type="v_prediction", with_prior_preservation=True, class_data_dir=tmp_path / "class",
                      class_prompt="a photo of dog", num_class_images=1, num_inference_steps=2)) == 0
    assert seen and seen[0]["prediction_type"] == "epsilon" and not seen[0].get("rescale_betas_zero_snr")

"""Every noise and loss option through the trainer: train_step, a short CLI run per option, the
WebUI metadata, sampling and class images under zero terminal SNR."""
import json

import pytest
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import safe_open

from dreambooth_offset.cli import main
from dreambooth_offset.training.auto_offset import RECORD_NAME
from dreambooth_offset.training.models import training_scheduler
from dreambooth_offset.sampling.generate import sampler_overrides
from tests.tiny import flags

SD = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


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
    # `export` of the diffusers file reads training_config.json (and the auto record) beside it:
    # the same metadata as training wrote, all but what only training knows (steps, times)
    assert main(["export", str(out), "-o", str(tmp_path / "exported" / "run-a.safetensors")]) == 0
    exported = _metadata(tmp_path / "exported" / "run-a.safetensors")
    only_training = {"ss_steps", "ss_training_started_at", "ss_training_finished_at", "modelspec.date"}
    assert {k: v for k, v in meta.items() if k not in only_training} == exported

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
    from dreambooth_offset.sampling import class_images as prior

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

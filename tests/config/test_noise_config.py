"""The noise and loss sections: contradictions fail early, naming the keys; valid ones round-trip."""

import pytest

from dreambooth_offset.cli import main
from dreambooth_offset.config import load_config
from dreambooth_offset.errors import UsageError
from tests.tiny import flags

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

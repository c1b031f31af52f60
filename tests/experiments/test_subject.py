"""experiment subject: the subject images, the fidelity measure, the command and report (tiny base)."""
import json

import torch

from dreambooth_offset.cli import main
from dreambooth_offset.experiments.subject import (
    SHAPE_FOUND_AT,
    SUBJECT_HUE,
    SUBJECT_RGB,
    render_subject,
    shape_score,
    through_vae,
)
from dreambooth_offset.sampling.metrics import colour_fraction, hue_saturation_value, template_match


def test_hsv_matches_the_textbook_values():
    rgb = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5], list(SUBJECT_RGB)]).T
    h, s, v = hue_saturation_value(rgb.reshape(3, 1, 6))
    assert torch.allclose(h.flatten()[:5], torch.tensor([0.0, 120.0, 240.0, 60.0, 0.0]))
    assert abs(float(h.flatten()[5]) - SUBJECT_HUE) < 0.5
    assert torch.allclose(s.flatten()[:5], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(v.flatten()[:5], torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5]))


def test_the_subject_colour_counts_whatever_its_brightness_and_nothing_else_does():
    from dreambooth_offset.base_model.synthetic import COLOURS

    subject = render_subject(64, torch.Generator().manual_seed(0))
    area = float(colour_fraction(subject[None], SUBJECT_HUE))
    assert 0.08 < area < 0.25  # the plus sign's area
    assert float(colour_fraction(subject[None] * 0.25, SUBJECT_HUE)) == area  # a dark subject is still there
    for name, rgb in COLOURS.items():  # none of the base's own colours is taken for the subject
        assert float(colour_fraction(torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, 4, 4), SUBJECT_HUE)) == 0, name


def test_template_match_finds_a_shape_wherever_and_however_bright_it_is():
    plus = torch.zeros(9, 9)
    plus[3:6, :] = plus[:, 3:6] = 1
    image = torch.full((1, 3, 32, 32), 0.4)
    image[0, :, 10:19, 5:14] = torch.where(plus.bool(), 0.9, 0.4)  # the plus, at one place
    assert abs(float(template_match(image, [plus])) - 1.0) < 1e-6  # the exact shape: r = 1
    assert abs(float(template_match(image * 0.1, [plus])) - 1.0) < 1e-6  # darkened: the same
    square = torch.full((1, 3, 32, 32), 0.4)
    square[0, :, 10:19, 5:14] = 0.9
    assert float(template_match(square, [plus])) < 0.75  # a filled square is not a plus
    assert float(template_match(torch.full((1, 3, 32, 32), 0.4), [plus])) == 0  # a flat image scores 0


def test_the_shape_threshold_tells_the_subject_from_the_bases_own_images():
    """SHAPE_FOUND_AT through the shipped VAE: measured (docs/dark-and-bright.md) on 1,000 base
    images (99th percentile 0.625) and 200 subject images (lowest 0.651). Here fewer, so binomial
    bounds: of 300 base images at most 3 % reach it (expected about 1 %: 3 in 300, sd 1.7), of 40
    subject images at least 90 % do."""
    from diffusers import AutoencoderKL

    from dreambooth_offset.base_model.synthetic import render_one
    from dreambooth_offset.experiments.shipped import SHIPPED_BASE

    vae = AutoencoderKL.from_pretrained(SHIPPED_BASE / "vae")
    g = torch.Generator().manual_seed(1)
    base = torch.cat([through_vae(vae, torch.stack([render_one(64, g)[0] for _ in range(100)])) for _ in range(3)])
    g = torch.Generator().manual_seed(2)
    subject = through_vae(vae, torch.stack([render_subject(64, g) for _ in range(40)]))
    assert float((shape_score(base) >= SHAPE_FOUND_AT).float().mean()) <= 0.03
    assert float((shape_score(subject) >= SHAPE_FOUND_AT).float().mean()) >= 0.9
    assert float(colour_fraction(subject, SUBJECT_HUE).max()) == 0  # why not the colour: the VAE loses the magenta


def test_report_with_brightness_and_fidelity(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["experiment", "subject", "--pretrained_model_name_or_path", str(tiny_model),
                 "--instance_data_dir", str(instance_dir), "--instance_prompt", "a photo of sks dog",
                 "--subject_hue", "20", "--output_dir", str(out), "--num_images", "2", "--num_inference_steps", "2",
                 "--max_train_steps", "2", "--optimizer", "adamw"])
    printed = capsys.readouterr().out
    assert code == 0 and "; colour " in printed and "| prompt | base | noise_offset=0 | noise_offset=0.1 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["base", "noise_offset=0", "noise_offset=0.1"]
    prompts = ["a photo of sks dog", "a photo of sks dog at night in a very dark room",
               "a photo of sks dog in the snow on a bright sunny day"]
    for run in results["runs"]:
        assert list(run["prompts"]) == prompts
        for stats in run["prompts"].values():
            assert stats["subject_present"] in (0.0, 0.5, 1.0)  # a share of the 2 samples
            assert stats["subject_area"] <= stats["subject_present"] or stats["subject_area"] < 0.03
    assert 0 < results["instance"]["subject_area"] < 1  # the reddish instance images, hue 20
    assert "subject_shape" not in results["instance"]  # your own subject: no plus sign to look for
    assert (out / "grid-2.png").is_file() and (out / "differences.png").is_file()
    paired = (out / "report.md").read_text().split("## Difference from noise_offset=0, per start noise")[1]
    assert "![each run minus noise_offset=0, +- 2 standard errors](differences.png)" in paired
    assert "| noise_offset=0.1 | 0 |" in paired and "| noise_offset=0 |" not in paired and "| base |" not in paired


def test_another_base_needs_the_subjects_images(tiny_model, tmp_path, capsys):
    assert main(["experiment", "subject", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(tmp_path / "r")]) == 2
    assert "--instance_data_dir is required" in capsys.readouterr().err


def test_shipped_default_trains_on_timesteps_300_and_up_with_the_prior_set(tmp_path, monkeypatch):
    # docs/dark-and-bright.md, "A subject in the dark and in the light": the 0.15 bars on three seeds
    from dreambooth_offset.experiments import subject

    seen = []
    monkeypatch.setattr(subject, "run_experiment", lambda cfg: seen.append(cfg) or {"runs": [], "wall_time_s": 0.0})
    assert main(["experiment", "subject", "--output_dir", str(tmp_path / "r")]) == 0
    train = seen[-1].train
    assert (train["min_timestep"], train["max_train_steps"], train["with_prior_preservation"]) == (300, 500, True)
    assert not train.get("train_text_encoder")

"""experiment subject: the subject images, the fidelity measure, the command and report (tiny base)."""
import json

import torch

from dreambooth_offset.cli import main
from dreambooth_offset.experiments.subject import SUBJECT_HUE, SUBJECT_RGB, render_subject
from dreambooth_offset.sampling.metrics import colour_fraction, hue_saturation_value


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


def test_report_with_brightness_and_fidelity(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["experiment", "subject", "--pretrained_model_name_or_path", str(tiny_model),
                 "--instance_data_dir", str(instance_dir), "--instance_prompt", "a photo of sks dog",
                 "--subject_hue", "20", "--output_dir", str(out), "--num_images", "2", "--num_inference_steps", "2",
                 "--max_train_steps", "2", "--optimizer", "adamw"])
    printed = capsys.readouterr().out
    assert code == 0 and "subject" in printed and "| prompt | base | noise_offset=0 | noise_offset=0.1 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["base", "noise_offset=0", "noise_offset=0.1"]
    prompts = ["a photo of sks dog", "a photo of sks dog at night in a very dark room",
               "a photo of sks dog in the snow on a bright sunny day"]
    for run in results["runs"]:
        assert list(run["prompts"]) == prompts
        for stats in run["prompts"].values():
            assert stats["subject_present"] in (0.0, 0.5, 1.0)  # a share of the 2 samples
            assert stats["subject_area"] <= stats["subject_present"] or stats["subject_area"] < 0.03
    assert 0 < results["instance_subject_area"] < 1  # the reddish instance images, hue 20
    assert (out / "report.md").is_file() and (out / "grid-2.png").is_file()


def test_another_base_needs_the_subjects_images(tiny_model, tmp_path, capsys):
    assert main(["experiment", "subject", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(tmp_path / "r")]) == 2
    assert "--instance_data_dir is required" in capsys.readouterr().err

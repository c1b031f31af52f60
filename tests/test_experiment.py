"""The black-image experiment's machinery on the tiny model (fast); the regression case on the
shipped base is tests/test_black_image.py."""
import json

import torch

from dreambooth_offset.cli import main
from dreambooth_offset.experiments.report import fit_line, prompt_stats


def test_fit_line_slope_and_r2():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert fit_line(x, 2 * x + 1) == (2.0, 1.0)
    slope, r2 = fit_line(x, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert abs(slope) < 0.5 and r2 < 0.3
    assert fit_line(torch.ones(4), x) == (0.0, 0.0)


def test_slope_is_fitted_within_channels():
    # each channel's output mean = 5 x its start mean + a channel-specific offset: one pooled line
    # would see the offsets as scatter; the within-channel fit recovers slope 5 exactly
    g = torch.Generator().manual_seed(0)
    starts = torch.randn(16, 4, 8, 8, generator=g)
    offsets = torch.tensor([3.0, -2.0, 0.5, 1.0]).view(1, 4, 1, 1)
    finals = 5 * starts.mean(dim=(2, 3), keepdim=True) + offsets + torch.zeros(16, 4, 8, 8)
    stats = prompt_stats(torch.rand(16, 3, 8, 8, generator=g), starts, finals)
    assert abs(stats.slope - 5.0) < 1e-6 and abs(stats.r2 - 1.0) < 1e-6
    _, pooled_r2 = fit_line(starts.mean(dim=(2, 3)), finals.mean(dim=(2, 3)))
    assert pooled_r2 < 0.5


def test_report_files_and_schema(tiny_model, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(out), "--seeds", "0", "--num_images", "2", "--num_inference_steps", "2",
                 "--max_train_steps", "2", "--prompts", "a photo of sks dog", "--optimizer", "adamw",
                 "--set", "lr_scheduler=cosine", "--prior_prompts", "a photo of a dog", ""])
    printed = capsys.readouterr().out
    assert code == 0 and "| run |" in printed and "wall time" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["black_prompt"] == "A solid black image" and results["wall_time_s"] > 0
    names = [r["name"] for r in results["runs"]]
    assert names == ["base", "noise_offset=0", "noise_offset=0, start from the leak", "noise_offset=0.1"]
    for run in results["runs"]:
        for stats in run["prompts"].values():
            assert set(stats) == {"mean_luminance", "std", "dark_fraction", "slope", "r2"}
    offsets = {r["name"]: r["noise_offset"] for r in results["runs"]}
    assert offsets["noise_offset=0"] == 0.0 and offsets["noise_offset=0.1"] == 0.1
    runs = json.loads((out / "runs" / "noise_offset=0.1-seed0" / "training_config.json").read_text())
    assert runs["lr_scheduler"] == "cosine" and runs["noise_offset"] == 0.1
    # prior preservation: the base's sample per prompt, its caption beside it, used as class images
    assert runs["with_prior_preservation"] and runs["caption_extension"] == ".txt" and runs["num_class_images"] == 2
    prior = out / "data" / "prior"
    assert sorted(p.name for p in prior.iterdir()) == ["prior-0000.png", "prior-0000.txt", "prior-0001.png",
                                                        "prior-0001.txt"]
    assert [(prior / f"prior-000{i}.txt").read_text().strip() for i in (0, 1)] == ["a photo of a dog", ""]
    assert results["settings"]["prior_prompts"] == ["a photo of a dog", ""]
    for name in ("report.md", "grid-0.png", "grid-1.png", "histogram.png"):
        assert (out / name).is_file()


def test_unknown_variant_and_setting_fail_before_any_run(tiny_model, tmp_path, capsys):
    base = ["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
            "--output_dir", str(tmp_path / "r")]
    assert main(base + ["--variants", "offset", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(base + ["--set", "noise_ofset=0.1"]) == 2
    assert "noise_ofset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_shipped_prior_prompts_are_the_bases_captions_without_the_evaluated_ones():
    from dreambooth_offset.experiments import shipped_prior_prompts
    from dreambooth_offset.synthetic import caption_words

    first = shipped_prior_prompts(200, [])
    assert first == shipped_prior_prompts(200, [])  # fixed by its seed
    assert 5 <= sum(not p for p in first) <= 40  # about a tenth unconditional, as in pre-training
    words = set(caption_words())
    assert all(set(p.split()) <= words for p in first)
    evaluated = [p for p in first if p][:3]
    assert not set(evaluated) & set(shipped_prior_prompts(200, [e.upper() for e in evaluated]))


def test_prior_size_needs_the_shipped_base(tiny_model, tmp_path, capsys):
    argv = ["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
            "--output_dir", str(tmp_path / "r"), "--prior_size", "4"]
    assert main(argv) == 2
    assert "--prior_prompts" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

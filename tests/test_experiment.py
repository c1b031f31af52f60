"""The black-image experiment's machinery on the tiny model (fast); the regression case on the
shipped base is tests/test_black_image.py."""
import json

import torch

from dreambooth_offset.cli import main
from dreambooth_offset.experiments.report import fit_line


def test_fit_line_slope_and_r2():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert fit_line(x, 2 * x + 1) == (2.0, 1.0)
    slope, r2 = fit_line(x, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert abs(slope) < 0.5 and r2 < 0.3
    assert fit_line(torch.ones(4), x) == (0.0, 0.0)


def test_report_files_and_schema(tiny_model, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(out), "--seeds", "0", "--num_images", "2", "--num_inference_steps", "2",
                 "--max_train_steps", "2", "--prompts", "a photo of sks dog", "--optimizer", "adamw",
                 "--set", "lr_scheduler=cosine"])
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

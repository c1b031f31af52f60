"""experiment brightness-range: its training set, its command and report (tiny base, seconds)."""
import json

import numpy as np
import torch
from PIL import Image

from dreambooth_offset.cli import main
from dreambooth_offset.experiments.brightness_range import SHIPPED_PROMPTS, write_training_set
from tests.captions import kind_in_words
from tests.experiments.stats_schema import check_prompt_stats
from tests.tiny import write_images


def test_the_shipped_training_set_spans_the_levels_and_leaves_out_the_evaluated_prompts(tmp_path):
    from dreambooth_offset.base_model.synthetic import KINDS, LEVELS
    from dreambooth_offset.sampling.metrics import mean_luminance

    folder = write_training_set(tmp_path / "train", 40, SHIPPED_PROMPTS)
    images = sorted(folder.glob("train-*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    assert len(images) == 40 and not {c.lower() for c in captions} & {p.lower() for p in SHIPPED_PROMPTS}
    y = [float(mean_luminance(torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)[None]
                              .float() / 255)) for p in images]
    words = [w for w, _, _ in LEVELS]  # the level the caption names: longest match first ("very dark" before "dark")
    level = [max((i for i, w in enumerate(words) if c.startswith((f"a {w} ", f"{w} "))), key=lambda i: len(words[i]),
                 default=words.index("")) for c in captions]
    assert [level.count(i) for i in range(len(LEVELS))] == [8] * 5, level  # 8 per level
    # each image's mean luminance in its caption's range (PNG rounding can move a mean by 1/510)
    assert all(LEVELS[lv][1] - 0.01 <= v < LEVELS[lv][2] + 0.01 for lv, v in zip(level, y)), list(zip(level, y))
    assert any("very dark" in c for c in captions) and any("very bright" in c for c in captions)
    cells = {(lv, kind): [lv2 == lv and kind_in_words(c) == kind for lv2, c in zip(level, captions)].count(True)
             for lv in range(len(LEVELS)) for kind in KINDS}
    assert sorted(cells.values()) == [1] * 10 + [2] * 15, cells  # every kind at every level, 40 over 25 cells
    kinds = [sum(n for (_, kind), n in cells.items() if kind == k) for k in KINDS]
    assert kinds == [8] * 5, kinds
    assert write_training_set(tmp_path / "train", 40, SHIPPED_PROMPTS) == folder  # the same set again
    assert [p.with_suffix(".txt").read_text().strip() for p in sorted(folder.glob("train-*.png"))] == captions


def test_report_in_guttenbergs_shape(tiny_model, tmp_path, capsys):
    data = write_images(tmp_path / "data", [(10, 10, 10), (245, 245, 245), (128, 128, 128)])
    for i, caption in enumerate(["a dark photo", "a bright photo", "a photo"]):
        (data / f"img{i}.txt").write_text(caption)
    out = tmp_path / "report"
    code = main(["experiment", "brightness-range", "--pretrained_model_name_or_path", str(tiny_model),
                 "--train_data_dir", str(data), "--output_dir", str(out), "--seeds", "0", "--num_images", "2",
                 "--num_inference_steps", "2", "--max_train_steps", "2", "--optimizer", "adamw",
                 "--prompts", "a dark photo of sks dog", "a bright photo of sks dog"])
    printed = capsys.readouterr().out
    assert code == 0 and "| prompt | base | noise_offset=0 | noise_offset=0.1 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["base", "noise_offset=0", "noise_offset=0.1"]
    for run in results["runs"]:
        assert set(run["prompts"]) == {"a dark photo of sks dog", "a bright photo of sks dog"}
        for stats in run["prompts"].values():
            check_prompt_stats(stats, num_images=2)
    trained = json.loads((out / "runs" / "noise_offset=0.1-seed0" / "training_config.json").read_text())
    assert trained["instance_data_dir"] == str(data) and trained["caption_extension"] == ".txt"
    assert trained["noise_offset"] == 0.1
    for name in ("report.md", "grid-0.png", "grid-1.png", "histogram-0.png", "histogram-1.png", "differences.png"):
        assert (out / name).is_file()
    paired = (out / "report.md").read_text().split("## Difference from the base, per start noise")[1]
    assert "| noise_offset=0 | 0 |" in paired and "| noise_offset=0.1 | 0 |" in paired and "| base |" not in paired


def test_paired_table_takes_each_run_minus_the_base_per_start_noise():
    from dreambooth_offset.experiments.report import paired_differences, paired_table

    rows = [{"name": "base", "seed": None, "prompts": {"p": {"per_sample_luminance": [0.5, 0.6, 0.7]},
                                                       "q": {"per_sample_luminance": [0.2, 0.2, 0.2]}}},
            {"name": "run", "seed": 3, "prompts": {"p": {"per_sample_luminance": [0.6, 0.6, 0.9]}}}]
    # differences 0.1, 0.0, 0.2: mean 0.1, standard deviation 0.1, standard error 0.1 / sqrt(3)
    table = paired_table(paired_differences(rows, ["p", "q"], antithetic=False), ["p", "q"])
    assert table.splitlines()[2] == "| run | 3 | +0.100 +- 0.058 | - |"


def test_paired_table_with_antithetic_start_noises_takes_the_error_over_the_pairs():
    from dreambooth_offset.experiments.report import paired_differences, paired_table

    rows = [{"name": "base", "seed": None, "prompts": {"p": {"per_sample_luminance": [0.5, 0.5, 0.5, 0.5]}}},
            {"name": "run", "seed": 0, "prompts": {"p": {"per_sample_luminance": [0.7, 0.3, 0.8, 0.4]}}}]
    # differences +0.2, -0.2, +0.3, -0.1: the pairs' means 0.0 and +0.1, their standard deviation
    # 0.0707, the error 0.05; taken over the four samples as if independent it would read 0.108
    table = paired_table(paired_differences(rows, ["p"], antithetic=True), ["p"])
    assert table.splitlines()[2] == "| run | 0 | +0.050 +- 0.050 |"


def test_paired_table_against_another_run_pairs_each_seed_with_its_own():
    from dreambooth_offset.experiments.report import paired_differences, paired_table

    def row(name, seed, values):
        return {"name": name, "seed": seed, "prompts": {"p": {"per_sample_luminance": values}}}

    rows = [row("base", None, [0.5, 0.5]), row("off", 0, [0.4, 0.6]), row("on", 0, [0.2, 0.4]),
            row("off", 1, [0.7, 0.7]), row("on", 1, [0.8, 0.9])]
    lines = paired_table(paired_differences(rows, ["p"], antithetic=False, against="off"), ["p"]).splitlines()
    # seed 0: -0.2, -0.2 (standard error 0); seed 1: +0.1, +0.2 (standard deviation 0.0707, error 0.05)
    assert lines[2:] == ["| on | 0 | -0.200 +- 0.000 |", "| on | 1 | +0.150 +- 0.050 |"]


def test_another_base_needs_its_training_images(tiny_model, tmp_path, capsys):
    assert main(["experiment", "brightness-range", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(tmp_path / "r")]) == 2
    assert "--train_data_dir is required" in capsys.readouterr().err


def test_prior_dir_trains_the_class_images_with_their_captions(tiny_model, tmp_path):
    data = write_images(tmp_path / "data", [(10, 10, 10), (245, 245, 245)])
    prior = write_images(tmp_path / "prior", [(128, 128, 128), (60, 60, 60)])
    for folder, captions in ((data, ["a dark photo", "a bright photo"]), (prior, ["a photo", ""])):
        for i, caption in enumerate(captions):
            (folder / f"img{i}.txt").write_text(caption)
    out = tmp_path / "report"
    assert main(["experiment", "brightness-range", "--pretrained_model_name_or_path", str(tiny_model),
                 "--train_data_dir", str(data), "--prior_dir", str(prior), "--output_dir", str(out), "--seeds", "0",
                 "--noise_offset", "0.1", "--num_images", "2", "--num_inference_steps", "2", "--max_train_steps", "2",
                 "--optimizer", "adamw", "--prompts", "a dark photo"]) == 0
    trained = json.loads((out / "runs" / "noise_offset=0.1-seed0" / "training_config.json").read_text())
    assert trained["with_prior_preservation"] and trained["class_data_dir"] == str(prior)
    assert trained["num_class_images"] == 2 and trained["instance_data_dir"] == str(data)

"""The black-image experiment's machinery on the tiny model (fast); the regression case on the
shipped base is tests/test_black_image.py."""
import json

import pytest
import torch

from dreambooth_offset.cli import main
from dreambooth_offset.experiments.report import fit_line, prompt_stats
from tests.experiments.stats_schema import check_prompt_stats


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


@pytest.mark.parametrize("family", ["tiny_model", "tiny_sdxl"])
def test_report_files_and_schema(family, request, tmp_path, capsys):
    tiny_model = request.getfixturevalue(family)
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
            check_prompt_stats(stats, num_images=2)
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
    for name in ("report.md", "grid-0.png", "grid-1.png", "histogram.png", "differences.png"):
        assert (out / name).is_file()
    paired = (out / "report.md").read_text().split("## Difference from the base, per start noise")[1]
    assert "| noise_offset=0.1 | 0 |" in paired and "start from the leak |" not in paired  # not the base's starts


@pytest.mark.slow
def test_parallel_runs_match_one_at_a_time(tiny_model, tmp_path):
    # the same runs in worker processes: same rows in the same order, same figures (up to the
    # float noise of another thread count), the LoRA files written where a sequential run puts them
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert main(["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
                     "--output_dir", str(out), "--seeds", "0", "1", "--num_images", "2", "--num_inference_steps", "2",
                     "--max_train_steps", "3", "--prompts", "a photo of sks dog", "--optimizer", "adamw",
                     "--jobs", str(jobs)]) == 0
        results[jobs] = json.loads((out / "results.json").read_text())
        assert results[jobs]["settings"]["jobs"] == jobs
        assert len(list((out / "runs").glob("*/pytorch_lora_weights.safetensors"))) == 4
    one, two = ([(r["name"], r["seed"], r["prompts"]) for r in results[j]["runs"]] for j in (1, 2))
    assert [row[:2] for row in one] == [row[:2] for row in two] == [
        ("base", None), ("noise_offset=0", 0), ("noise_offset=0, start from the leak", 0), ("noise_offset=0.1", 0),
        ("noise_offset=0", 1), ("noise_offset=0.1", 1)]
    for (_, _, a), (_, _, b) in zip(one, two):
        for prompt in a:
            assert abs(a[prompt]["mean_luminance"] - b[prompt]["mean_luminance"]) < 1e-3, (prompt, a, b)


@pytest.mark.slow
def test_a_failed_parallel_run_stops_the_experiment(tiny_model, tmp_path, capsys):
    # every run diverges at once; the error reaches the caller (one line, exit 1) and the queued runs never start
    code = main(["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(tmp_path), "--seeds", "0", "1", "2", "3", "4", "--num_images", "2",
                 "--num_inference_steps", "2", "--max_train_steps", "50", "--prompts", "a photo of sks dog",
                 "--optimizer", "adamw", "--learning_rate", "1e30", "--set", "max_grad_norm=0", "--jobs", "2"])
    assert code == 1
    assert "dreambooth-offset experiment: loss became" in capsys.readouterr().err
    started = [p.name for p in (tmp_path / "runs").iterdir()]
    assert started and not any(name.endswith("seed4") for name in started), started


def test_unknown_variant_and_setting_fail_before_any_run(tiny_model, tmp_path, capsys):
    base = ["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
            "--output_dir", str(tmp_path / "r")]
    assert main(base + ["--variants", "offset", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(base + ["--set", "noise_ofset=0.1"]) == 2
    assert "noise_ofset" in capsys.readouterr().err
    assert main(base + ["--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_shipped_prior_is_the_bases_training_data_without_the_evaluated_prompts(tmp_path):
    from dreambooth_offset.experiments.shipped import write_shipped_prior
    from dreambooth_offset.sampling.metrics import luminance
    from dreambooth_offset.base_model.synthetic import caption_words

    def captions_and_luminances(folder):
        from dreambooth_offset.data.images import load_resized

        txts = sorted(folder.glob("*.txt"))
        images = load_resized(sorted(folder.glob("*.png")), 64)
        return ([t.read_text().strip() for t in txts],
                [float(luminance(i.float()[None] / 255).mean()) for i in images])

    captions, lums = captions_and_luminances(write_shipped_prior(tmp_path / "a", 120, []))
    assert len(captions) == len(lums) == 120
    assert (captions, lums) == captions_and_luminances(write_shipped_prior(tmp_path / "b", 120, []))  # seeded
    assert 3 <= sum(not c for c in captions) <= 25  # about a tenth unconditional, as in pre-training
    assert all(set(c.split()) <= set(caption_words()) for c in captions)
    assert min(lums) < 0.12 and max(lums) > 0.88  # real data: the captioned brightness levels
    evaluated = [c for c in captions if c][:3]
    again, _ = captions_and_luminances(write_shipped_prior(tmp_path / "c", 120, [e.upper() for e in evaluated]))
    assert not set(evaluated) & set(again)
    write_shipped_prior(tmp_path / "a", 10, [])  # a rerun with a smaller set leaves no leftovers
    assert len(list((tmp_path / "a").iterdir())) == 20


def test_prior_options_are_checked_before_any_run(tiny_model, tmp_path, capsys):
    base = ["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
            "--output_dir", str(tmp_path / "r")]
    assert main(base + ["--prior_size", "4"]) == 2  # the tiny model is not the shipped base
    assert "--prior_dir" in capsys.readouterr().err
    assert main(base + ["--prior_dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--prior_dir" in err and "missing" in err
    assert main(base + ["--prior_dir", str(tmp_path), "--prior_prompts", "a dog"]) == 2
    assert "one of" in capsys.readouterr().err
    assert main(base + ["--output_preservation"]) == 2  # its captions are the prior set's: there is none
    assert "--output_preservation" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("output_preservation", [False, True])
def test_prior_dir_trains_its_images_as_class_images(tiny_model, tmp_path, output_preservation):
    from PIL import Image

    prior = tmp_path / "reg"
    prior.mkdir()
    for i, caption in enumerate(["a photo of a dog", ""]):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(prior / f"{i}.png")
        (prior / f"{i}.txt").write_text(caption)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(prior / "no_caption.png")
    out = tmp_path / "report"
    code = main(["experiment", "black-image", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(out), "--noise_offset", "0.1", "--num_images", "2",
                 "--num_inference_steps", "2", "--max_train_steps", "1", "--optimizer", "adamw",
                 "--prompts", "a photo of sks dog", "--prior_dir", str(prior)]
                + ["--output_preservation"] * output_preservation)
    assert code == 0
    run = json.loads((out / "runs" / "noise_offset=0.1-seed0" / "training_config.json").read_text())
    assert run["with_prior_preservation"] and run["class_data_dir"] == str(prior)
    assert run["num_class_images"] == 3 and run["caption_extension"] == ".txt"
    # the twins' captions: the prior set's in file order (the class prompt where none), each then empty
    assert run["output_preservation_prompts"] == (
        ["a photo of a dog", "", "", "", "an image", ""] if output_preservation else [])
    assert sorted(p.name for p in prior.iterdir()) == ["0.png", "0.txt", "1.png", "1.txt", "no_caption.png"]
    assert json.loads((out / "results.json").read_text())["settings"]["prior_dir"] == str(prior)


def test_shipped_default_keeps_prompts_with_the_bases_training_data(tmp_path, monkeypatch):
    from dreambooth_offset.experiments import black_image
    from dreambooth_offset.experiments.shipped import SHIPPED_PRIOR_SIZE

    seen = []
    monkeypatch.setattr(black_image, "run_experiment",
                        lambda cfg: seen.append(cfg) or {"runs": [], "wall_time_s": 0.0})
    assert main(["experiment", "black-image", "--output_dir", str(tmp_path / "r")]) == 0
    cfg = seen[-1]
    assert cfg.prior_dir == str(tmp_path / "r" / "data" / "prior")
    # the brightness range's settings: timesteps 700-999 and the text encoder (docs/black-image-experiment.md)
    train = cfg.train
    assert (train["max_train_steps"], train["min_timestep"], train["train_text_encoder"]) == (400, 700, True)
    assert len(list((tmp_path / "r" / "data" / "prior").glob("*.png"))) == SHIPPED_PRIOR_SIZE
    # --prior_size 0 is Guttenberg's setup, the black image alone; another prior set replaces the default
    assert main(["experiment", "black-image", "--output_dir", str(tmp_path / "s"), "--prior_size", "0"]) == 0
    assert seen[-1].prior_dir is None and not seen[-1].prior_prompts and not (tmp_path / "s").exists()
    assert main(["experiment", "black-image", "--output_dir", str(tmp_path / "t"), "--prior_prompts", "a dog"]) == 0
    assert seen[-1].prior_prompts == ("a dog",) and seen[-1].prior_dir is None


def test_start_noises_come_in_antithetic_pairs_unless_asked_otherwise(tmp_path, monkeypatch, capsys):
    from dreambooth_offset.experiments import black_image

    seen = []
    monkeypatch.setattr(black_image, "run_experiment",
                        lambda cfg: seen.append(cfg) or {"runs": [], "wall_time_s": 0.0})
    common = ["experiment", "black-image", "--prior_size", "0"]
    assert main([*common, "--output_dir", str(tmp_path / "a")]) == 0 and seen[-1].antithetic
    assert main([*common, "--output_dir", str(tmp_path / "b"), "--num_images", "7"]) == 2
    assert "--num_images 7: antithetic start noises come in pairs" in capsys.readouterr().err
    assert main([*common, "--output_dir", str(tmp_path / "c"), "--num_images", "7", "--independent_start_noises"]) == 0
    assert not seen[-1].antithetic and seen[-1].num_images == 7

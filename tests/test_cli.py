"""The command line: bad input gets one line on stderr, exit code 2, no traceback, nothing written;
every flag of every command has help text and says its default."""
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_offset.cli import main
from tests.tiny import flags


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _check(code, err, needle, out):
    assert code == 2
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_missing_instance_folder(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(flags(tiny_model, tmp_path / "missing", out), capsys)
    _check(code, err, "missing", out)


def test_empty_instance_folder(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    _check(*_run(flags(tiny_model, tmp_path / "empty", out), capsys), "no images found", out)


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_bad_image_file_is_named(tiny_model, tmp_path, capsys, kind):
    folder = tmp_path / "inst"
    folder.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "ok.png")
    if kind == "text":
        (folder / "bad.png").write_text("hello")
    else:
        Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "bad.png")
        data = (folder / "bad.png").read_bytes()
        (folder / "bad.png").write_bytes(data[:60])
    out = tmp_path / "out"
    _check(*_run(flags(tiny_model, folder, out), capsys), "bad.png", out)


def test_missing_model_folder(instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _check(*_run(flags(tmp_path / "no-model", instance_dir, out), capsys), "no-model", out)


def test_uncached_hub_id(instance_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "out"
    _check(*_run(flags("someone/not-cached-model", instance_dir, out), capsys), "someone/not-cached-model", out)


def test_prior_preservation_without_class_prompt(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = flags(tiny_model, instance_dir, out, with_prior_preservation=True, class_data_dir=tmp_path / "c")
    _check(*_run(argv, capsys), "class_prompt", out)


def test_resolution_not_multiple_of_8(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _check(*_run(flags(tiny_model, instance_dir, out, resolution=12), capsys), "multiple of 8", out)


def test_unknown_config_key(tiny_model, instance_dir, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("learning_rat = 1e-4\n")
    out = tmp_path / "out"
    _check(*_run(flags(tiny_model, instance_dir, out) + ["--config", str(cfg)], capsys), "learning_rat", out)


def test_unwritable_output_folder(tiny_model, instance_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # a folder cannot be made under a file, even as root
    _check(*_run(flags(tiny_model, instance_dir, out), capsys), str(out), out)


def test_unknown_or_abbreviated_flag_is_an_argparse_error(tiny_model, instance_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(flags(tiny_model, instance_dir, tmp_path / "out") + ["--learning_rat", "1"])
    assert exc.value.code == 2


COMMANDS = (["train"], ["generate"], ["experiment", "black-image"], ["export"], ["import"], ["inspect"],
            ["pretrain-base"])


def _parser(words):
    import argparse

    from dreambooth_offset.cli import build_parser

    parser = build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_flag_has_help_and_says_its_default(words, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out
    flags = [a for a in _parser(words)._actions if a.dest != "help"]
    assert flags
    for action in flags:
        text = action.help or ""
        assert len(text) > 10, f"{' '.join(words)} {action.option_strings or action.dest}: no help text"
        told = "default" in text.lower() or "required" in text or not action.option_strings or \
            action.dest == "mechanism_check" or "Same as --" in text  # positional / a switch / an alias
        assert told, f"{' '.join(words)} {action.option_strings}: the help does not say the default"


def test_flags_are_declared_only_in_the_schema():
    """Every flag comes from a config field: `add_argument` appears in the package only where the
    schema becomes flags (config/load.py) and for `--config`."""
    package = Path(__file__).resolve().parents[1] / "dreambooth_offset"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if ".add_argument(" in p.read_text())
    assert users == ["config/load.py"]

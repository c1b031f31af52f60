"""Typed, frozen run configuration.

One flat namespace of keys, grouped into dataclasses by concern. The same key is a command-line
flag (`--noise_offset 0.1`) and a TOML key (`noise_offset = 0.1`). Precedence, lowest first:
field defaults < the `--config` TOML file < command-line flags. Unknown keys and contradictory
settings raise `UsageError` naming the key before any model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth_offset.config_sections import (  # noqa: F401  (re-exported: the sections' one import path)
    AdapterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
    option,
)
from dreambooth_offset.errors import UsageError
from dreambooth_offset.noise_config import LossConfig, NoiseConfig  # noqa: F401


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.noise.zero_terminal_snr and self.loss.prediction_type != "v_prediction":
            raise UsageError(
                f"zero_terminal_snr needs prediction_type = 'v_prediction' (got {self.loss.prediction_type!r}): "
                "at the last timestep the input is pure noise, so an epsilon target equals the input and teaches "
                "nothing, and the sampler's x0 = (x_T - s_T * eps) / a_T divides by a_T = 0 (Lin et al. 2023). "
                "Pass --prediction_type v_prediction"
            )

    def to_dict(self) -> dict[str, Any]:
        """The flat key -> value mapping, the same keys a TOML file or the command line take."""
        flat: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                flat[key] = list(value) if isinstance(value, tuple) else value
        return flat

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# kohya's sd-scripts metadata names (`ss_<name>`) where they differ from our keys.
KOHYA_NAMES = {"snr_gamma": "min_snr_gamma"}


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every noise and loss setting of a run, under kohya's metadata name where kohya has one
    (`min_snr_gamma` for `snr_gamma`); the WebUI file writes each as `ss_<name>`."""
    settings = {**dataclasses.asdict(cfg.noise), **dataclasses.asdict(cfg.loss)}
    return {KOHYA_NAMES.get(k, k): v for k, v in settings.items()}


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}

# Flags accepted for compatibility with diffusers' example scripts: name -> (key, value it sets).
ALIASES: dict[str, tuple[str, Any]] = {
    "offset_noise": ("noise_offset", 0.1),  # diffusers train_dreambooth.py --offset_noise (fixed 0.1)
    "use_8bit_adam": ("optimizer", "adamw8bit"),  # diffusers --use_8bit_adam
}


def _key_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Every config key -> (section name, its dataclass field, its resolved type)."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (section, f, hints[f.name])
    return out


KEYS = _key_fields()


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_sequence) for the annotations used above."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0], True
    if args:  # Optional[X]
        return args[0], False
    return tp, False


def _coerce(key: str, value: Any) -> Any:
    """Check a TOML value against the key's type; tuples for sequences."""
    _, f, tp = KEYS[key]
    base, is_seq = _base_type(tp)
    if value is None:
        return None
    words = f.metadata.get("words") or ()
    if words and isinstance(value, str):
        if value not in words:
            raise UsageError(f"{key} must be {base.__name__} or {' or '.join(map(repr, words))}, got {value!r}")
        return value
    if is_seq:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, base) for v in values):
            raise UsageError(f"{key} must be a list of {base.__name__}, got {value!r}")
        return tuple(values)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UsageError(f"{key} must be {base.__name__}, got {value!r}")
    return value


def _number_or_words(base: type, words: tuple[str, ...]):
    """An argparse type: a `base` number, or one of `words` (e.g. `--noise_offset auto`)."""
    def parse(text: str) -> Any:
        if text in words:
            return text
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {' or '.join(words)}, got {text!r}") from None
    parse.__name__ = f"{base.__name__} or {'/'.join(words)}"
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key. Defaults are suppressed so that only given flags override the file."""
    parser.add_argument("--config", help="TOML file whose keys are these flag names.")
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for key, (_, f, tp) in ((k, v) for k, v in KEYS.items() if v[0] == section):
            base, is_seq = _base_type(tp)
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {f.default})"}
            if base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _number_or_words(base, f.metadata["words"]) if f.metadata.get("words") else base
                kwargs["nargs"] = "+" if is_seq else None
                kwargs["choices"] = f.metadata.get("choices")
            group.add_argument(f"--{key}", **kwargs)
    compat = parser.add_argument_group("compatibility with diffusers' scripts")
    for alias, (key, value) in ALIASES.items():
        compat.add_argument(f"--{alias}", action="store_true", default=argparse.SUPPRESS, help=f"Same as --{key} {value}.")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < TOML file at `path` < `overrides` (already-typed values, e.g. parsed flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise UsageError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            file_values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"config file {path} is not valid TOML: {err}") from None
        values.update(_resolve_aliases(file_values, source=str(path)))
    values.update(_resolve_aliases(dict(overrides or {}), source="command line"))
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise UsageError(f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        sections[KEYS[key][0]][key] = _coerce(key, value)
    return RunConfig(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})


def _resolve_aliases(values: dict[str, Any], source: str) -> dict[str, Any]:
    for alias, (key, implied) in ALIASES.items():
        if alias not in values:
            continue
        if values.pop(alias) is False:
            continue
        if key in values and values[key] != implied:
            raise UsageError(f"{source}: --{alias} means {key} = {implied!r}, but {key} = {values[key]!r} is also given")
        values[key] = implied
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {k: v for k, v in vars(args).items() if k in KEYS or k in ALIASES}
    return load_config(getattr(args, "config", None), given)

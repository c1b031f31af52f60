"""Flags and TOML files from a command's schema.

A schema (`RunConfig` for train, commands.py and recipe.py for the others) is one flat namespace
of keys, grouped into sections. The same key is a command-line flag (`--noise_offset 0.1`) and a
TOML key (`noise_offset = 0.1`). Precedence, lowest first: field defaults < the `--config` TOML
file < command-line flags. Unknown keys and contradictory settings raise `UsageError` naming the
key before any model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import tomllib
import typing
from pathlib import Path
from typing import Any, NamedTuple

from dreambooth_offset.config.run import RunConfig
from dreambooth_offset.errors import UsageError

# Flags `train` accepts for compatibility with diffusers' example scripts: name -> (key, value it sets).
ALIASES: dict[str, tuple[str, Any]] = {
    "offset_noise": ("noise_offset", 0.1),  # diffusers train_dreambooth.py --offset_noise (fixed 0.1)
    "use_8bit_adam": ("optimizer", "adamw8bit"),  # diffusers --use_8bit_adam
}


class Key(NamedTuple):
    section: str  # the schema's field that holds the key's section
    field: dataclasses.Field
    type: Any  # the field's resolved annotation


@functools.lru_cache(maxsize=None)
def schema_keys(schema: type = RunConfig) -> dict[str, Key]:
    """Every key a command's schema takes -> where it lives; a section's `keys` limit what it gives."""
    out: dict[str, Key] = {}
    hints = typing.get_type_hints(schema)
    for part in dataclasses.fields(schema):
        cls, wanted = hints[part.name], part.metadata.get("keys")
        section_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if wanted is None or f.name in wanted:
                if f.name in out:
                    raise TypeError(f"{schema.__name__}: key {f.name!r} is declared twice")
                out[f.name] = Key(part.name, f, section_hints[f.name])
    return out


def _aliases(schema: type) -> dict[str, tuple[str, Any]]:
    return ALIASES if schema is RunConfig else {}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_sequence) for the annotations the sections use."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0], True
    if args:  # Optional[X]
        return args[0], False
    return tp, False


def _coerce(key: Key, name: str, value: Any) -> Any:
    """Check a TOML value against the key's type; tuples for sequences."""
    base, is_seq = _base_type(key.type)
    if value is None:
        return None
    words = key.field.metadata.get("words") or ()
    if words and isinstance(value, str):
        if value not in words:
            raise UsageError(f"{name} must be {base.__name__} or {' or '.join(map(repr, words))}, got {value!r}")
        return value
    if is_seq:
        values = [value] if isinstance(value, str) else value
        values = [float(v) if base is float and type(v) is int else v for v in values] if isinstance(values, list) else values
        if not isinstance(values, list) or not all(isinstance(v, base) for v in values):
            raise UsageError(f"{name} must be a list of {base.__name__}, got {value!r}")
        return tuple(values)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UsageError(f"{name} must be {base.__name__}, got {value!r}")
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


def _shown(value: Any) -> str:
    if value is None or value == () or value == "":
        return "none"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _add_flag(group, name: str, key: Key) -> None:
    """One key's flag; its default is suppressed so that only given flags override the file."""
    meta, default = key.field.metadata, key.field.default
    base, is_seq = _base_type(key.type)
    note = " (required)" if meta["required"] else f" (default: {_shown(default)})"
    if "default" in meta["help"].lower():  # the help says the default in words
        note = ""
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": meta["help"] + note}
    if base is bool and meta["flag"]:  # a switch that turns a default-on key off
        kwargs.update(action="store_false", help=meta["help"])
    elif base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _number_or_words(base, meta["words"]) if meta["words"] else base
        kwargs["nargs"] = "+" if is_seq else None
        kwargs["choices"] = meta["choices"]
    if meta["positional"]:
        group.add_argument(name, metavar=name.upper(), **kwargs)
        return
    flags = [f"--{meta['flag'] or name}"] + ([meta["short"]] if meta["short"] else [])
    group.add_argument(*flags, dest=name, required=meta["required"], **kwargs)


def add_arguments(parser: argparse.ArgumentParser, schema: type = RunConfig, keys: tuple[str, ...] | None = None,
                  config_file: bool = True, description: str | None = None) -> None:
    """One flag per key of `schema` (or of `keys` only), grouped by section; `--config` for a TOML file."""
    if config_file:
        parser.add_argument("--config", help="TOML file whose keys are these flag names (default: none).")
    groups: dict[str, Any] = {}
    for name, key in schema_keys(schema).items():
        if keys is None or name in keys:
            if key.section not in groups:
                groups[key.section] = parser.add_argument_group(key.section, description)
            _add_flag(groups[key.section], name, key)
    if keys is None and _aliases(schema):
        compat = parser.add_argument_group("compatibility with diffusers' scripts")
        for alias, (key, value) in _aliases(schema).items():
            compat.add_argument(f"--{alias}", action="store_true", default=argparse.SUPPRESS,
                                help=f"Same as --{key} {value}.")


def given_values(args: argparse.Namespace, schema: type = RunConfig, keys: tuple[str, ...] | None = None) -> dict:
    """The keys of `schema` (or of `keys` only) given on the command line, and their values."""
    known = set(schema_keys(schema)) | set(_aliases(schema))
    return {k: v for k, v in vars(args).items() if k in known and (keys is None or k in keys)}


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, schema: type = RunConfig):
    """Defaults < TOML file at `path` < `overrides` (already-typed values, e.g. parsed flags), as `schema`."""
    keys = schema_keys(schema)
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_resolve_aliases(read_toml(path), str(path), schema))
    values.update(_resolve_aliases(dict(overrides or {}), "command line", schema))
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise UsageError(f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    sections: dict[str, dict[str, Any]] = {f.name: {} for f in dataclasses.fields(schema)}
    for name, value in values.items():
        sections[keys[name].section][name] = _coerce(keys[name], name, value)
    hints = typing.get_type_hints(schema)
    return schema(**{part: hints[part](**kw) for part, kw in sections.items()})


def _resolve_aliases(values: dict[str, Any], source: str, schema: type) -> dict[str, Any]:
    for alias, (key, implied) in _aliases(schema).items():
        if alias not in values:
            continue
        if values.pop(alias) is False:
            continue
        if key in values and values[key] != implied:
            raise UsageError(f"{source}: --{alias} means {key} = {implied!r}, but {key} = {values[key]!r} is also given")
        values[key] = implied
    return values


def config_from_args(args: argparse.Namespace, schema: type = RunConfig):
    return load_config(getattr(args, "config", None), given_values(args, schema), schema)

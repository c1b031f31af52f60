"""How a config field and a command's sections are declared.

`option()` declares one field: its default, its help text and what it accepts. It is at once a
TOML key and a command-line flag of the same name; `load.py` builds both from it.
`section()` puts a config section into a command's schema, optionally only some of its keys
(`generate` takes `seed` from the trainer's section, not the rest of it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from dreambooth_offset.errors import UsageError


def option(default: Any, help: str, choices: tuple | None = None, words: tuple[str, ...] = (),
           required: bool = False, positional: bool = False, short: str | None = None, flag: str | None = None) -> Any:
    """A config field.

    choices: the values it accepts; words: strings a numeric key also accepts in place of a
    number (`noise_offset = "auto"`); required: the command line must give it (`default` is then
    the empty value that a check refuses); positional / short: how the flag is spelled
    (`inspect FILE`, `-o`); flag: the flag's name where it differs from the key (a boolean that
    defaults to True is switched off by `--no_<key>`, as `--no_mechanism_check`)."""
    metadata = {"help": help, "choices": choices, "words": words, "required": required,
                "positional": positional, "short": short, "flag": flag}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, keys: tuple[str, ...] | None = None) -> Any:
    """A section of a command's schema: every key of `cls`, or only `keys` (the rest keep their defaults)."""
    return field(default_factory=cls, metadata={"keys": keys})


def check_choices(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UsageError(f"{f.name} = {value!r} is not one of {', '.join(map(str, choices))}")


def check_positive(cfg: Any, *keys: str, minimum: int | float = 1) -> None:
    """Raise naming the first of `keys` whose value is below `minimum`."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and value < minimum:
            raise UsageError(f"{key} = {value}: it must be at least {minimum}")

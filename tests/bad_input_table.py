"""The bad-input table's registry and the helpers its cases share: each case is a function that
sets up a bad input and returns the command line, registered with the exit code and the text its
one line must hold (tests/test_bad_input.py runs them all)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

from tests.tiny import flags, write_images


class Case(NamedTuple):
    name: str
    setup: Callable  # ctx -> argv
    code: int
    needle: str  # in the one line printed


CASES: list[Case] = []


def case(code: int, needle: str):
    def register(setup):
        CASES.append(Case(setup.__name__, setup, code, needle))
        return setup
    return register


def _images(ctx, name: str, colours=((200, 80, 40),)) -> Path:
    return write_images(ctx.tmp / name, list(colours))


def _train(ctx, data, **extra):
    return flags(ctx.model, data, ctx.out, **{"max_train_steps": 1, "optimizer": "adamw", **extra})


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG file whose header claims `width` x `height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path

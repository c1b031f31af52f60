"""Reading `.safetensors` files, and refusing every pickle (`.ckpt`, `.bin`, `.pt`, ...) unopened:
unpickling runs code the file chooses. LoRA files and single-file checkpoints both come in here."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from dreambooth_offset.errors import UsageError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
PICKLE_NOTE = ("a pickle file, which can run code when loaded, so it is never unpickled here; "
               "convert it to .safetensors with a tool you trust")
T = TypeVar("T")


def read_safetensors(path: Path, read: Callable[[object], T]) -> T:
    """`read(f)` on the `safe_open` handle of `path`. A pickle (by its name, or by its first bytes:
    a torch zip archive or a raw pickle stream) and any other unreadable file end in one UsageError."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"{path}: {PICKLE_NOTE}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK") or magic[:1] == b"\x80":
            raise UsageError(f"{path}: {PICKLE_NOTE}") from None
        raise UsageError(f"{path}: not a safetensors file ({str(err).splitlines()[0]})") from None

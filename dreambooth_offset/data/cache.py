"""Caches that never go stale (docs/datasets.md, "Caches").

An entry is a few named tensors, held in memory for the run or written as one safetensors file
whose name is the digest of everything the entry is computed from: the image file's bytes, the
model's weights, the crop and flip, the format below. A changed image, VAE, text encoder or
resolution therefore gets a new name, and an old entry is never read for it (kohya's sd-scripts
issues 931 and 2362 are caches keyed by file name only). Files are written atomically (a
temporary file renamed into place) and an entry that cannot be read is rebuilt, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
from torch import Tensor

# Bump when what an entry holds, or how its input is prepared (decoding, resizing, cropping),
# changes: every key includes it, so entries of an older format are left unread.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dreambooth-offset, else ~/.cache/dreambooth-offset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreambooth-offset"


def digest(*parts) -> str:
    """A hex SHA-256 of JSON-able parts (an entry's name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_digest(item) -> str:
    """SHA-256 of a file's bytes, or of the bytes a dataset holds for an image (`.data`)."""
    h = hashlib.sha256()
    data = getattr(item, "data", None)
    if data is not None:
        h.update(data)
        return h.hexdigest()
    with open(item, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a model's class, tensor names, dtypes, shapes and bytes: its identity as an
    entry's input (the same weights loaded from another file or folder give the same digest)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TensorCache:
    """Entries of named CPU tensors: in memory (`folder` None), or one file each in `folder`, read
    when a step needs it so that memory does not grow with the number of entries."""

    def __init__(self, folder: Path | None, keys: tuple[str, ...]):
        self.folder, self.keys, self.memory = folder, keys, {}
        self.read = self.built = 0  # entries found on disk / computed, since the start
        self.seconds = 0.0  # spent in fill()

    def get(self, key: Hashable) -> dict[str, Tensor] | None:
        if self.folder is None:
            return self.memory.get(key)
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            entry = load_file(path)
            missing = [k for k in self.keys if k not in entry]
            if missing:
                raise ValueError(f"no tensor {missing[0]!r}")
        except Exception as err:  # truncated, overwritten, another format: all mean "build it again"
            from tqdm.auto import tqdm  # writes above a progress bar, not inside it

            tqdm.write(f"warning: cache entry {path} cannot be read ({type(err).__name__}: {err}); rebuilding it",
                       file=sys.stderr)
            return None
        self.read += 1
        return entry

    def put(self, key: Hashable, entry: dict[str, Tensor]) -> None:
        self.built += 1
        entry = {k: v.detach().cpu().contiguous() for k, v in entry.items()}
        if self.folder is None:
            self.memory[key] = entry
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.safetensors"
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(entry, temporary)
        os.replace(temporary, path)  # atomic: a reader sees the old file, or none, or the whole new one

    def fill(self, keys: list[Hashable], make: Callable[[int], dict[str, Tensor]], desc: str) -> None:
        """Make sure entry `keys[i]` exists for every i (`make(i)` builds a missing one), with a
        progress bar; on disk, each existing entry is read once to find corrupt ones now."""
        import time

        from tqdm.auto import tqdm

        start = time.perf_counter()
        for i, key in enumerate(tqdm(keys, desc=desc, leave=False)):
            if self.get(key) is None:
                self.put(key, make(i))
        self.seconds += time.perf_counter() - start

    def describe(self, what: str) -> str:
        where = "memory" if self.folder is None else str(self.folder)
        return f"{what} cache ({where}): {self.read} entries read, {self.built} built in {self.seconds:.1f} s"

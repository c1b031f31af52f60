"""The file readers against files from anywhere: a few hundred mutations of a valid export, built
with one seeded generator, each through `inspect` and `import` (and `export` for diffusers files).
Every one ends in a correct load or a clean one-line error, never a traceback, a hang or a
memory blow-up (bounded time per file)."""
from __future__ import annotations

import json
import math
import random
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_offset.cli import main
from tests.tiny import flags

SECONDS_PER_FILE = 10.0  # a few hundred ms is usual; a hang or a huge allocation would blow through it
FOREIGN_PARTS = ("hada_w1_a", "hada_w2_b", "lokr_w1", "lokr_w2_a", "dora_scale", "diff", "oft_blocks")
DTYPES = (torch.int8, torch.int64, torch.uint8, torch.bool, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def valid(sd1_model, instance_dir, tmp_path_factory):
    """A trained LoRA of an SD 1.x-shaped base: its WebUI file and its diffusers file."""
    out = tmp_path_factory.mktemp("valid")
    assert main(flags(sd1_model, instance_dir, out, max_train_steps=1, optimizer="adamw", rank=2,
                      unet_target_modules=["to_q", "to_k", "conv1"], train_text_encoder=True)) == 0
    return out / f"{out.name}.safetensors", out / "pytorch_lora_weights.safetensors"


def _header(raw: bytes) -> tuple[int, dict]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, header: dict) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def mutate(raw: bytes, rng: random.Random) -> tuple[str, dict[str, torch.Tensor] | bytes, dict | None]:
    """One mutation: (kind, tensors to save with metadata, or raw bytes)."""
    kind = rng.choice(("flip", "truncate", "dtype", "alpha", "drop", "rank", "foreign", "transpose", "shape",
                       "metadata", "empty_value"))
    if kind == "flip":
        data = bytearray(raw)
        n, _ = _header(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 8 + n)] = rng.randrange(256)
        return kind, bytes(data), None
    if kind == "truncate":
        return kind, raw[: rng.randrange(0, len(raw))], None
    if kind == "shape":  # a declared shape far beyond the data: the reader must not allocate it
        n, header = _header(raw)
        key = rng.choice([k for k in header if k != "__metadata__"])
        header[key]["shape"] = [1 << rng.randint(20, 40), 1 << rng.randint(10, 30)]
        return kind, _with_header(raw, header), None
    if kind == "metadata":
        n, header = _header(raw)
        meta = dict(header.get("__metadata__", {}))
        key = rng.choice(["lora_adapter_metadata", "ss_base_model_version", "ss_network_alpha", "sshs_model_hash"])
        meta[key] = rng.choice(["{not json", "sdxl_base_v1-0", "NaN", "", "[]", "{\"unet.r\": -1}"])
        header["__metadata__"] = meta
        return kind, _with_header(raw, header), None
    tensors = _tensors(raw)
    keys = sorted(tensors)
    key = rng.choice(keys)
    if kind == "dtype":
        tensors[key] = tensors[key].to(rng.choice(DTYPES))
    elif kind == "alpha":
        alphas = [k for k in keys if k.endswith(".alpha")] or keys
        value = rng.choice([math.nan, math.inf, -1.0, 0.0, 1e30])
        tensors[rng.choice(alphas)] = rng.choice([torch.tensor(value), torch.full((2,), value)])
    elif kind == "drop":
        del tensors[key]
    elif kind == "rank":
        t = tensors[key]
        tensors[key] = rng.choice([t.flatten(), t.reshape(1, *t.shape), t.reshape(*t.shape, 1, 1)])
    elif kind == "foreign":
        stem = key.rsplit(".", 2)[0] if key.startswith(("unet.", "text_encoder.")) else key.split(".")[0]
        tensors[f"{stem}.{rng.choice(FOREIGN_PARTS)}"] = torch.randn(2, 2)
    elif kind == "transpose" and tensors[key].ndim == 2:
        tensors[key] = tensors[key].t().contiguous()
    elif kind == "empty_value":
        tensors[key] = torch.zeros(0, *tensors[key].shape[1:])
    return kind, tensors, _metadata(raw)


def _tensors(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return dict(load(raw))


def _metadata(raw: bytes) -> dict | None:
    return _header(raw)[1].get("__metadata__")


def _check(argv: list[str], capsys) -> int:
    started = time.monotonic()
    code = main(argv)
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert took < SECONDS_PER_FILE, f"{argv}: {took:.1f} s"
    assert code in (0, 2), f"{argv}: exit {code}\n{err[-1500:]}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("dreambooth-offset ")]
        assert len(lines) == 1, err[-1500:]
    return code


@pytest.mark.parametrize("fmt", ["webui", "diffusers"])
def test_mutated_files_load_or_fail_in_one_line(valid, fmt, tmp_path, capsys):
    source = valid[0] if fmt == "webui" else valid[1]
    raw = source.read_bytes()
    rng = random.Random(f"fuzz-{fmt}")
    outcomes: dict[str, list[int]] = {}
    for i in range(150):
        kind, payload, metadata = mutate(raw, rng)
        path = tmp_path / f"m{i:03d}.safetensors"
        if isinstance(payload, bytes):
            path.write_bytes(payload)
        else:
            save_file(payload, path, metadata=metadata)
        codes = [_check(["inspect", str(path)], capsys)]
        if fmt == "webui":
            codes.append(_check(["import", str(path), "-o", str(tmp_path / f"imported{i:03d}")], capsys))
        else:
            codes.append(_check(["export", str(path), "-o", str(tmp_path / f"exported{i:03d}.safetensors"),
                                 "--base", "sd_v1"], capsys))
        outcomes.setdefault(kind, []).extend(codes)
    print(fmt, {k: f"{v.count(0)} loaded, {v.count(2)} refused" for k, v in sorted(outcomes.items())})
    assert len(outcomes) >= 8  # the generator reached most kinds of damage
    assert any(2 in v for v in outcomes.values()) and any(0 in v for v in outcomes.values())


def test_an_unmutated_file_round_trips(valid, tmp_path, capsys):
    """The control: the valid export imports, and the import holds the same weights."""
    assert _check(["import", str(valid[0]), "-o", str(tmp_path / "back")], capsys) == 0
    assert load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")

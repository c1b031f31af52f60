"""Single-file checkpoints (one `.safetensors`, as the WebUIs keep them) as the base model.

The base is told from the file's tensor names alone (the header, no weights read): the text
encoder's layout names SD 1.x (Hugging Face CLIP under `cond_stage_model.transformer.`), SD 2.x
(OpenCLIP under `cond_stage_model.model.`) or SDXL (both under `conditioner.embedders.`). The
configs diffusers' loader needs come from a local diffusers folder: the ones shipped with the
package (`architectures.CONFIGS`), or `--single_file_config`. Nothing is downloaded, and a pickled
checkpoint (`.ckpt`, `.pt`, `.bin`) is refused before anything could unpickle it.

SD 2.x files do not say whether they predict noise (2.x-base, 512 px) or v (2.0/2.1, 768 px);
the shipped default is 768-v, as diffusers' own default for SD 2 files (docs/sdxl.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from dreambooth_offset.errors import UsageError
from dreambooth_offset.safe_read import read_safetensors
from dreambooth_offset.training.architectures import CLIP_BPE, CONFIGS

SHIPPED = ("sd_v1", "sd_v2", "sd_v2_v", "sdxl")
_TEXT_ENCODER_KEYS = {  # a tensor each base's text encoder has, in the file's own naming
    "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
    "sd_v2": "cond_stage_model.model.token_embedding.weight",
    "sd_v1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
}
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def is_single_file(name: str) -> bool:
    """True for a path to a file (not a diffusers folder, not a hub id)."""
    return Path(name).expanduser().is_file()


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes from a safetensors header (no weights read); pickles refused unopened."""
    return read_safetensors(Path(path).expanduser(), lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})


def detect_base(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """`sd_v1`, `sd_v2` or `sdxl` from a checkpoint's tensor names (SD 2.x files are `sd_v2` here
    whatever their prediction type; `shipped_config` picks the config)."""
    if _UNET_IN not in shapes:
        raise UsageError(f"{path}: not a Stable Diffusion checkpoint (no UNet under model.diffusion_model.)")
    if shapes[_UNET_IN][1] != 4:
        raise UsageError(f"{path}: a UNet with {shapes[_UNET_IN][1]} input channels (an inpainting or other "
                         "special model); only text-to-image checkpoints (4 channels) train here")
    for base, key in _TEXT_ENCODER_KEYS.items():
        if key in shapes:
            return base
    raise UsageError(f"{path}: no text encoder of SD 1.x, SD 2.x or SDXL in the file (a UNet-only or "
                     "refiner checkpoint?); pass a full checkpoint or a diffusers folder")


def shipped_config(base: str) -> Path:
    """The shipped config folder for a detected base: SD 2.x files get 2.1's 768-v config."""
    return CONFIGS / ("sd_v2_v" if base == "sd_v2" else base)


def config_folder(path: str | Path, base: str, choice: str | None) -> Path:
    """`--single_file_config`: a shipped base's name or a local diffusers folder; default from the tensors."""
    from dreambooth_offset.training.models import resolve_local

    if choice is None:
        folder = shipped_config(base)
    elif choice in SHIPPED:
        folder = CONFIGS / choice
    else:
        folder = Path(resolve_local(choice, None, "--single_file_config"))
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(f"--single_file_config {choice}: {folder} has no model_index.json (give one of "
                         f"{', '.join(SHIPPED)} or a diffusers folder)")
    config_sdxl = "XL" in json.loads(index.read_text()).get("_class_name", "")
    if config_sdxl != (base == "sdxl"):
        names = {True: "SDXL", False: "SD 1.x/2.x"}
        raise UsageError(f"--single_file_config {choice} describes {names[config_sdxl]}, but {path} holds "
                         f"{names[base == 'sdxl']} weights")
    return folder


def tokenizer(folder: Path, subfolder: str):
    """A config folder's CLIP tokenizer: its own files if it has them, else CLIP's shipped vocabulary
    with the folder's tokenizer_config.json (pad token and length)."""
    from transformers import CLIPTokenizer

    if any((folder / subfolder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        return CLIPTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    settings = json.loads((folder / subfolder / "tokenizer_config.json").read_text())
    return CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), **settings)


def load_components(path: str | Path, config_choice: str | None) -> tuple[dict, Path]:
    """The pipeline components of a single-file checkpoint (weights converted by diffusers'
    `from_single_file`, configs from `config_folder`), and that folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path).expanduser()
    base = detect_base(path, tensor_shapes(path))
    folder = config_folder(path, base, config_choice)
    sdxl = base == "sdxl"
    tokenizers = {name: tokenizer(folder, name) for name in (("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",))}
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipeline = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(
            str(path), config=str(folder), local_files_only=True, **tokenizers, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # e.g. a tensor of another shape
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise UsageError(f"cannot load {path} with the configs in {folder}: {first_line} (pass "
                         "--single_file_config with the configs that describe this file)") from None
    return dict(pipeline.components), folder


@functools.lru_cache(maxsize=8)
def model_hashes(path: str, size: int, mtime: float) -> tuple[str, str]:
    """(A1111's legacy model hash, the file's sha256) as kohya records them in `ss_sd_model_hash` /
    `ss_new_sd_model_hash`: the legacy one hashes the 64 KiB at offset 1 MiB (8 hex digits), the
    new one the whole file (A1111 shows its first 10). `size`/`mtime` key the cache."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        while chunk := f.read(1 << 24):
            full.update(chunk)
    return legacy, full.hexdigest()


def file_hashes(name: str) -> dict[str, str]:
    """The kohya hash keys of a single-file base (empty for a folder or hub id)."""
    if not is_single_file(name):
        return {}
    path = Path(name).expanduser().resolve()
    stat = path.stat()
    legacy, full = model_hashes(str(path), stat.st_size, stat.st_mtime)
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": full}

"""LoRA weights between peft/diffusers naming and the kohya (WebUI) format.

Everything passes through `Modules`: "unet.<module path>" / "text_encoder.<module path>" ->
LoraModule(down, up, alpha), text-encoder paths under `text_model.` as the WebUIs name them. The
update a module adds to its weight is `up @ down * alpha / rank`, kohya's and A1111's convention.
A DoRA module (peft's `use_dora`) also has a magnitude: its merged weight is `magnitude * V / ||V||`
per output row, V = W + update; the WebUI file stores it as `dora_scale` of shape (out, 1[, 1, 1]),
LyCORIS's output-axis (`wd_on_out`) layout (docs/usage.md, DoRA).
diffusers' converters do the renaming; this module adds the alpha (diffusers'
`convert_state_dict_to_kohya` writes the rank there, which drops peft's `lora_alpha / r` scale)
and the checks that turn a bad file into a one-line error. Reading a user's file: webui/lora_file.py.
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, NamedTuple

import torch

from dreambooth_offset.compat import kohya_to_diffusers
from dreambooth_offset.errors import UsageError
from dreambooth_offset.training.lora import write_diffusers_lora
from dreambooth_offset.webui.keys import (
    canonical_text_encoder_path, infer_base as _infer_base, ldm_to_diffusers_names, sgm_lora_name,
)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # a diffusers LoRA file's key prefixes
DTYPES = {"same": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoraModule(NamedTuple):
    down: torch.Tensor  # peft lora_A: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # peft lora_B: (out, rank) or (out, rank, 1, 1)
    alpha: float  # WebUI alpha: the update is up @ down * alpha / rank
    magnitude: torch.Tensor | None = None  # DoRA: the merged weight's norm per output row, (out,)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


Modules = dict[str, LoraModule]


def _scale(config: Mapping, module: str, rank: int, where: str) -> float:
    """peft's scale for `module`: lora_alpha / r, or / sqrt(r) with rsLoRA (rank/alpha patterns applied)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config.get("r") or rank)
    if r != rank:
        raise UsageError(f"{where}{module}: the tensors have rank {rank}, the adapter config says {r}")
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha"))
    if alpha is None:
        return 1.0  # no alpha recorded: diffusers loads such a file with alpha = rank
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_shapes(key: str, down: torch.Tensor, up: torch.Tensor, where: str) -> None:
    """A LoRA pair: floating-point, (rank, in[, kh, kw]) and (out, rank[, 1, 1]), rank >= 1."""
    if not (down.is_floating_point() and up.is_floating_point()):
        raise UsageError(f"{where}{key}: the weights are {down.dtype} / {up.dtype}, not floating point")
    ok = down.ndim == up.ndim and down.ndim in (2, 4) and up.shape[1] == down.shape[0] and down.numel() > 0 \
        and up.numel() > 0
    if ok and down.ndim == 4:
        ok = tuple(up.shape[2:]) == (1, 1)
    if not ok:
        raise UsageError(f"{where}{key}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a LoRA pair")


def _alpha(tensor: torch.Tensor, where: str) -> float:
    """A WebUI file's alpha: one finite, positive number."""
    value = float(tensor.reshape(-1)[0]) if tensor.numel() == 1 and tensor.dtype != torch.bool else math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{where}: alpha {tuple(tensor.shape)} {tensor.dtype} is not one finite positive number")
    return value


def modules_from_peft(state: Mapping[str, torch.Tensor], component: str, config: Mapping | None = None,
                      source: str = "") -> Modules:
    """Group one model's adapter weights (peft or diffusers naming) into modules with WebUI alphas."""
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    where = f"{source}: {component}." if source else f"{component}."
    if component == "unet":
        state = convert_unet_state_dict_to_peft(dict(state))
    else:  # lora_linear_layer.down and to_q_lora.down spellings -> lora_A
        state = convert_state_dict_to_peft(dict(state), original_type=StateDictType.DIFFUSERS_OLD)
    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        m = re.fullmatch(r"(.+)\.(?:lora_([AB])\.weight|lora_(magnitude)_vector(?:\.weight)?)", key)
        if m is None:
            raise UsageError(f"{where}{key}: not a LoRA weight (lora_A / lora_B / lora_magnitude_vector)")
        pairs[m[1]][m[2] or m[3]] = tensor
    modules = {}
    for path, pair in pairs.items():
        if not {"A", "B"} <= set(pair):
            raise UsageError(f"{where}{path}: lora_{'A' if 'B' in pair else 'B'} is missing")
        _check_shapes(path, pair["A"], pair["B"], where)
        rank = pair["A"].shape[0]
        alpha = _scale(config or {}, path, rank, where) * rank
        name = canonical_text_encoder_path(path) if component.startswith("text_encoder") else path
        magnitude = pair.get("magnitude")
        if magnitude is not None:
            out = pair["B"].shape[0]
            magnitude = _magnitude(magnitude, ((out,), (1, out, 1, 1)) if pair["A"].ndim == 4 else ((out,),),
                                   f"{where}{path}.lora_magnitude_vector")
        modules[f"{component}.{name}"] = LoraModule(pair["A"], pair["B"], alpha, magnitude)
    return modules


def _magnitude(tensor: torch.Tensor, shapes: tuple[tuple[int, ...], ...], where: str) -> torch.Tensor:
    """A DoRA magnitude, given in one of `shapes`, as a flat (out,) vector. peft's are (out,) /
    (1, out, 1, 1); a WebUI file's are (out, 1[, 1, 1]), the output axis. LyCORIS's default
    input-axis layout, (1, in[, 1, 1]), normalises each input column instead: another
    decomposition, which peft's DoRA cannot hold."""
    if not tensor.is_floating_point() or tuple(tensor.shape) not in shapes:
        axis = " (LyCORIS's input-axis DoRA, wd_on_out=False; peft's DoRA is per output row)" \
            if tensor.ndim >= 2 and tensor.shape[0] == 1 else ""
        raise UsageError(f"{where}: {tuple(tensor.shape)} {tensor.dtype} is not a magnitude per output row, "
                         f"{' or '.join(map(str, shapes))}{axis}")
    return tensor.reshape(-1)


def modules_from_diffusers(tensors: Mapping[str, torch.Tensor], adapter_meta: Mapping | None,
                           lora_alpha: float | None, source) -> Modules:
    """Modules of a diffusers LoRA file; alphas from its adapter metadata (or `lora_alpha`)."""
    modules = {}
    for component in COMPONENTS:
        prefix = component + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        config = {k[len(prefix):]: v for k, v in (adapter_meta or {}).items() if k.startswith(prefix)}
        if lora_alpha is not None:
            config = {**config, "lora_alpha": lora_alpha, "alpha_pattern": {}}
        if state:
            modules.update(modules_from_peft(state, component, config, str(source)))
    return modules


def kohya_name(key: str, base: str = "sd_v1") -> str:
    """The WebUI module name of "unet.<path>" / "text_encoder[_2].<path>": diffusers' converter's
    for SD 1.x/2.x (`lora_te_` for the text encoder); for SDXL, the SGM UNet name and `lora_te1_` /
    `lora_te2_`, as kohya's sd-scripts writes them (webui/keys.py)."""
    from diffusers.utils import convert_state_dict_to_kohya

    probe = torch.zeros(1, 1)  # the converter renames keys; the tensors do not matter
    part = convert_state_dict_to_kohya({f"{key}.lora_A.weight": probe, f"{key}.lora_B.weight": probe})
    name = next(iter(part)).split(".", 1)[0]
    if base == "sdxl":
        return sgm_lora_name(key.split(".", 1)[1]) if key.startswith("unet.") else name
    return "lora_te_" + name[len("lora_te1_"):] if name.startswith("lora_te1_") else name


def modules_to_kohya(modules: Modules, dtype: torch.dtype | None = None, base: str = "sd_v1") -> dict[str, torch.Tensor]:
    """kohya keys with `.lora_down.weight`, `.lora_up.weight`, `.alpha`: `lora_unet_<diffusers
    name>` / `lora_te_` for SD 1.x/2.x; for SDXL, `lora_unet_<SGM name>` / `lora_te1_` / `lora_te2_`,
    as kohya's sd-scripts writes them (`kohya_name`)."""
    out = {}
    for key, m in modules.items():
        name = kohya_name(key, base)
        tensors = {"lora_down.weight": m.down, "lora_up.weight": m.up}
        if m.magnitude is not None:  # ComfyUI/Forge read (out, 1[, 1, 1]) as the output axis
            tensors["dora_scale"] = m.magnitude.reshape(-1, *[1] * (m.down.ndim - 1))
        out.update({f"{name}.{what}": (t if dtype is None else t.to(dtype)).contiguous() for what, t in tensors.items()})
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha))  # the trained alpha
    return out


def modules_from_kohya(tensors: Mapping[str, torch.Tensor], source) -> Modules:
    """Modules of a kohya/WebUI file, named by diffusers' own converter (the one load_lora_weights uses)."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, what = key.partition(".")
        if what not in KOHYA_PARTS:
            raise UsageError(f"{source}: {key}: not a LoRA or DoRA key (LoHa/LoKr parts are not supported)")
        grouped[name][what] = tensor
    ldm = [n for n in grouped if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_", n)]
    if ldm:  # SDXL files and older SD ones use the LDM/SGM UNet's names: the table that knows them all
        tables = [ldm_to_diffusers_names(sdxl) for sdxl in (False, True)]
        renames = next((t for t in tables if all(n in t for n in ldm)), tables[any(n.startswith("lora_te2_") for n in grouped)])
        grouped = defaultdict(dict, {renames.get(n, n): parts for n, parts in grouped.items()})
    modules = {}
    for name, parts in grouped.items():
        if not {"lora_down.weight", "lora_up.weight"} <= set(parts):
            raise UsageError(f"{source}: {name}: lora_down/lora_up pair incomplete")
        _check_shapes(name, parts["lora_down.weight"], parts["lora_up.weight"], f"{source}: ")
        alpha = _alpha(parts["alpha"], f"{source}: {name}") if "alpha" in parts else None
        one = {f"{name}.{what}": t for what, t in parts.items() if what not in ("alpha", "dora_scale")}
        try:
            converted, _ = kohya_to_diffusers(one)
        except (ValueError, KeyError, RuntimeError, IndexError, TypeError) as err:
            raise UsageError(f"{source}: {name}: diffusers cannot place it ({str(err).strip().splitlines()[0]})") from None
        if not converted:
            raise UsageError(f"{source}: {name}: diffusers cannot place it (no module of that name)")
        component = next(iter(converted)).split(".", 1)[0]
        peft_part = {k.split(".", 1)[1]: v for k, v in converted.items()}
        (key, module), = modules_from_peft(peft_part, component, None, str(source)).items()
        magnitude = parts.get("dora_scale")
        if magnitude is not None:
            shape = (module.up.shape[0], *[1] * (module.down.ndim - 1))
            magnitude = _magnitude(magnitude, (shape,), f"{source}: {name}.dora_scale")
        modules[key] = module._replace(alpha=float(module.rank) if alpha is None else alpha,  # kohya: none = rank
                                       magnitude=magnitude)
    return modules


@functools.lru_cache(maxsize=None)
def _clip_has_text_model_root(component: str) -> bool:
    """Older transformers nest CLIPTextModel's layers under `text_model.`; newer ones do not, but
    still do for CLIPTextModelWithProjection (SDXL's `text_encoder_2`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1,
                            max_position_embeddings=4)
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        return hasattr(cls(config), "text_model")


def lora_config_kwargs(modules: Mapping[str, LoraModule]) -> dict:
    """LoraConfig arguments (most common rank/alpha, the rest as patterns) for one model's modules."""
    dora = {m.magnitude is not None for m in modules.values()}
    if len(dora) > 1:
        raise UsageError("some modules are DoRA and some plain LoRA; one diffusers adapter cannot hold both")
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: m.alpha for p, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha}, "use_dora": dora == {True}}


def _peft_magnitude(m: LoraModule) -> torch.Tensor:
    """peft's layout of a DoRA magnitude: (out,) for a Linear, (1, out, 1, 1) for a Conv2d."""
    return (m.magnitude.reshape(1, -1, 1, 1) if m.down.ndim == 4 else m.magnitude).contiguous()


def save_diffusers_lora(directory: str | Path, modules: Modules) -> Path:
    """Write `pytorch_lora_weights.safetensors` for load_lora_weights, with the alphas in its adapter metadata."""
    layers, configs = {}, {}
    for component in COMPONENTS:
        mine = {k.split(".", 1)[1]: m for k, m in modules.items() if k.startswith(component + ".")}
        if component != "unet" and not _clip_has_text_model_root(component):
            mine = {p.removeprefix("text_model."): m for p, m in mine.items()}
        if mine:
            state = {f"{p}.lora_{ab}.weight": t.contiguous() for p, m in mine.items() for ab, t in (("A", m.down), ("B", m.up))}
            state.update({f"{p}.lora_magnitude_vector": _peft_magnitude(m) for p, m in mine.items()
                          if m.magnitude is not None})
            # peft naming, as the trainer writes it: diffusers 0.42's load_lora_adapter converts the
            # old `to_q.lora.down` spelling only when the *first* key lacks `lora_A`, so the mix that
            # convert_state_dict_to_diffusers makes when convs are targeted loses the attention LoRA.
            layers[component] = state
            configs[component] = lora_config_kwargs(mine)
    return write_diffusers_lora(directory, layers.get("unet"), layers.get("text_encoder"), configs.get("unet"),
                                configs.get("text_encoder"), layers.get("text_encoder_2"), configs.get("text_encoder_2"))


def infer_base(modules: Modules) -> str | None:
    """sdxl when it has text_encoder_2 or SGM-only modules (label_emb), else sd_v1 / sd_v2 from the
    widths the cross-attention keys/values and text encoder read, if any."""
    if any(k.startswith(("text_encoder_2.", "unet.add_embedding.")) for k in modules):
        return "sdxl"
    dims = [m.down.shape[1] for k, m in modules.items()
            if k.endswith(("attn2.to_k", "attn2.to_v")) or (k.startswith("text_encoder.") and k.endswith(("_proj", "fc1")))]
    return _infer_base(dims)


def diffusers_accepts(tensors: Mapping[str, torch.Tensor]) -> str:
    """Whether diffusers' kohya converter (behind load_lora_weights) takes every key."""
    if any(k.endswith(".dora_scale") for k in tensors):  # its lora_state_dict filters them out
        return "drops the dora_scale keys and loads a plain LoRA (use the diffusers file, or `import`)"
    try:
        kohya_to_diffusers(dict(tensors))
    except (ValueError, KeyError) as err:
        return f"fails ({str(err).strip().splitlines()[0][:120]})"
    return f"{len(tensors)}/{len(tensors)} keys"

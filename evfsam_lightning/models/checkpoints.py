"""Checkpoint I/O: official EVF-SAM folders, SAM `.pth`, BEiT-3 `.pth`, the HF `facebook/sam-vit-*`
layout, and export back to the official layout.

Every load goes through `load_into`, which reports missing, unexpected and wrongly shaped keys and
fails with a message naming them unless the caller allows a named subset. Files are read safely:
safetensors, or `torch.load(weights_only=True)`.

Long on purpose (one concept): every on-disk weight layout the model reads or writes, with the key
maps between them, so that a layout's load and its export stand side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from evfsam_lightning.models.builders import EvfSamConfig, build_model, model_config

WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.json")
#: Named subsets a caller may allow to be missing from a checkpoint (prefixes of our key names).
SUBSETS = {
    "sam": ("visual_model.",),
    "beit3": ("mm_extractor.",),
    "projector": ("text_hidden_fcs.",),
    "sam_image_encoder": ("visual_model.vision_encoder.",),
    "presence": ("presence_head.",),
}
#: The optional presence head's file in an export folder (not part of the official layout): its
#: tensors under our key names (`presence_head.mlp.*`), the threshold in the metadata too.
PRESENCE_FILE = "presence_head.safetensors"
PRESENCE_PREFIX = "presence_head."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the file and keys."""


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, expected, got)
    loaded: int = 0

    def summary(self, limit: int = 20) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
        if self.mismatched:
            shown = "; ".join(f"{k}: model {tuple(e)} vs checkpoint {tuple(g)}" for k, e, g in self.mismatched[:limit])
            parts.append(f"{len(self.mismatched)} wrongly shaped: {shown}")
        return "; ".join(parts)


# -- reading files ------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors`, a sharded `*.index.json`, or a torch pickle read with
    `weights_only=True`. A corrupt or unreadable file raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())["weight_map"]
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.values())):
                out.update(read_state_dict(path.parent / shard))
            return out
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


# -- key names ----------------------------------------------------------------------------------
_SAM_PREFIX = "visual_model."


def _map_sam_part(state: Mapping[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """Apply `convert` (a backbone's state-level key map) to the `visual_model.` part of `state`."""
    out = {k: v for k, v in state.items() if not k.startswith(_SAM_PREFIX)}
    sam = {k[len(_SAM_PREFIX):]: v for k, v in state.items() if k.startswith(_SAM_PREFIX)}
    out.update({_SAM_PREFIX + k: v for k, v in convert(sam).items()})
    return out


def from_reference(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names -> ours (only the SAM part is renamed)."""
    return _map_sam_part(state, model.visual_model.from_reference_state)


def to_reference(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> the official ones."""
    return _map_sam_part(state, model.visual_model.to_reference_state)


def _prefixes(allow: Iterable[str]) -> tuple[str, ...]:
    out = []
    for name in allow:
        if name not in SUBSETS:
            raise ValueError(f"unknown subset {name!r} (known: {', '.join(SUBSETS)})")
        out.extend(SUBSETS[name])
    return tuple(out)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
              allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
              assign: bool = False) -> KeyReport:
    """Copy `state` (our key names) into `model`, casting each tensor to the parameter's dtype.

    Missing keys are an error unless they fall in one of the `allow_missing` subsets (see SUBSETS);
    unexpected keys are an error unless they start with one of the `allow_unexpected` prefixes;
    a wrongly shaped key is always an error. Nothing is copied when the check fails. With `assign`
    (a model built on the meta device) the tensors of `state` become the parameters: no second copy."""
    own = model.state_dict()
    report = KeyReport()
    missing_ok = _prefixes(allow_missing)
    unexpected_ok = tuple(allow_unexpected)
    report.missing = [k for k in own if k not in state and not k.startswith(missing_ok)]
    report.unexpected = [k for k in state if k not in own and not k.startswith(unexpected_ok)]
    report.mismatched = [(k, tuple(own[k].shape), tuple(v.shape)) for k, v in state.items()
                         if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if report.missing or report.unexpected or report.mismatched:
        raise CheckpointError(f"{source} does not fit the model: {report.summary()}")
    # A tensor still on the meta device (a part built without memory, see build_model's meta_parts)
    # has nothing to copy into: it takes the file's tensor, as every tensor does with `assign`.
    taken = {k: v.to(own[k].dtype).contiguous() for k, v in state.items() if k in own and (assign or own[k].is_meta)}
    if taken:
        model.load_state_dict(taken, strict=False, assign=True)
    with torch.no_grad():
        for k, v in state.items():
            if k in own and k not in taken:
                own[k].copy_(v.to(own[k].dtype))
    report.loaded = sum(k in own for k in state)
    return report


# -- the formats ----------------------------------------------------------------------------------
def load_reference_weights(model: nn.Module, path: str | os.PathLike, **allow) -> KeyReport:
    """A state dict under the official EVF-SAM key names (`mm_extractor.beit3.*`, `text_hidden_fcs.*`,
    `visual_model.*`) from one file."""
    return load_into(model, from_reference(model, read_state_dict(path)), source=str(path), **allow)


#: A key only the SAM-1 / only the SAM-2 own checkpoints have, to name a family mismatch plainly.
_FAMILY_MARKERS = {"sam": "image_encoder.patch_embed.proj.weight", "sam2": "image_encoder.trunk.patch_embed.proj.weight"}


def load_sam_checkpoint(model: nn.Module, path: str | os.PathLike) -> KeyReport:
    """SAM's own checkpoint into the SAM part; BEiT-3 and the projector are left as they are.

    SAM-1 `sam_vit_*.pth` (keys `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) for EVF-SAM,
    SAM-2 `sam2_hiera_*.pt` (`{"model": {...}}`: `image_encoder.trunk.*`, `sam_mask_decoder.*`, the
    memory modules, ...) for EVF-SAM2. EVF-SAM2 builds on SAM 2, not SAM 2.1 (whose files hold
    extra keys, reported as unexpected)."""
    state = read_state_dict(path)
    family = model.visual_model.family
    if _FAMILY_MARKERS[family] not in state:
        other = [f for f, marker in _FAMILY_MARKERS.items() if marker in state]
        found = f"a {other[0]} checkpoint" if other else f"no {_FAMILY_MARKERS[family]}"
        raise CheckpointError(f"{path}: the model's SAM family is {family!r} but the file holds {found}")
    state = {_SAM_PREFIX + k: v for k, v in state.items()}
    return load_into(model, from_reference(model, state), source=str(path), allow_missing=("beit3", "projector"))


def load_hf_sam_checkpoint(model: nn.Module, path: str | os.PathLike) -> KeyReport:
    """transformers' `facebook/sam-vit-*` layout (a folder or its `model.safetensors`) into the SAM part."""
    path = Path(path)
    state = read_state_dict(_weights_file(path) if path.is_dir() else path)
    shared = state.pop("shared_image_embedding.positional_embedding", None)
    pe = state.get("prompt_encoder.shared_embedding.positional_embedding")
    if shared is not None and pe is not None and not torch.equal(shared, pe):
        raise CheckpointError(f"{path}: shared_image_embedding and the prompt encoder's positional "
                              "matrix differ; the model has one copy")
    state = {_SAM_PREFIX + k: v for k, v in state.items()}
    return load_into(model, state, source=str(path), allow_missing=("beit3", "projector"))


def load_beit3_checkpoint(model: nn.Module, path: str | os.PathLike,
                          allow_unexpected: Iterable[str] = ()) -> KeyReport:
    """A BEiT-3 `.pth` (`{"model": {"beit3.*": ...}}`) into the fusion encoder. Keys outside `beit3.`
    (task heads of other BEiT-3 checkpoints) are errors unless their prefixes are allowed."""
    state = read_state_dict(path)
    state = {"mm_extractor." + k: v for k, v in state.items()}
    return load_into(model, state, source=str(path), allow_missing=("sam", "projector"),
                     allow_unexpected=tuple("mm_extractor." + p for p in allow_unexpected))


def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_SAFETENSORS, WEIGHTS_SAFETENSORS + ".index.json", WEIGHTS_BIN, WEIGHTS_BIN + ".index.json"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file ({WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN}, or a sharded index)")


#: (family, sam_scale, mm_extractor_scale) of an official config.json -> our named size
_REFERENCE_SCALES = {("sam", "huge", "large"): "evf-sam", ("sam", "huge", "base"): "evf-sam-beit3-base",
                     ("sam2", "large", "large"): "evf-sam2"}


def folder_model_config(folder: str | os.PathLike) -> EvfSamConfig:
    """The model config of a checkpoint folder: our `evfsam_lightning` block of `config.json` when
    present, else the official `sam_scale` / `mm_extractor_scale` fields."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: config.json not found (an EVF-SAM checkpoint folder has config.json, "
                              "model weights and tokenizer files)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
    if "evfsam_lightning" in cfg:
        return model_config(cfg["evfsam_lightning"]["model"])
    family = "sam2" if any("Sam2" in a for a in cfg.get("architectures", [])) else "sam"
    key = (family, cfg.get("sam_scale", "huge" if family == "sam" else "large"), cfg.get("mm_extractor_scale", "large"))
    if key not in _REFERENCE_SCALES:
        raise CheckpointError(f"{cfg_file}: no known model for family/sam_scale/mm_extractor_scale {key}")
    return model_config(_REFERENCE_SCALES[key])


def check_reference_folder(folder: str | os.PathLike, with_tokenizer: bool = True) -> None:
    """Raise `CheckpointError` naming every file an EVF-SAM checkpoint folder lacks (config.json,
    weights, and with `with_tokenizer` the sentencepiece model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (an EVF-SAM checkpoint folder has config.json, "
                              f"{WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN}, and {TOKENIZER_FILES[0]})")
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    try:
        _weights_file(folder)
    except CheckpointError:
        missing.append(f"{WEIGHTS_SAFETENSORS} (or {WEIGHTS_BIN}, or a sharded index)")
    if with_tokenizer and not (folder / TOKENIZER_FILES[0]).is_file():
        missing.append(f"{TOKENIZER_FILES[0]} (the tokenizer)")
    if missing:
        raise CheckpointError(f"{folder}: incomplete EVF-SAM checkpoint folder, missing {', '.join(missing)}")


def load_reference_folder(folder: str | os.PathLike, device: str | torch.device = "cpu",
                          with_tokenizer: bool = True):
    """An EVF-SAM checkpoint folder (official or exported by us): `config.json`, `model.safetensors`
    or `pytorch_model.bin`, and tokenizer files. Returns (model, tokenizer or None)."""
    folder = Path(folder)
    check_reference_folder(folder, with_tokenizer)
    cfg = folder_model_config(folder)
    weights = _weights_file(folder)
    tokenizer = None
    if with_tokenizer:
        from evfsam_lightning.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder)
    # Built on the meta device, the model takes the file's tensors as its own (load_into's assign):
    # one copy of the weights in memory, not an initialised model plus the file's tensors.
    has_presence = (folder / PRESENCE_FILE).is_file()  # ours only (the presence head), see export_reference
    model = build_model(cfg, device="meta", presence_head=has_presence)
    load_reference_weights(model, weights, assign=True, allow_missing=("presence",) if has_presence else ())
    if has_presence:
        model.presence_head.to_empty(device="cpu")
        load_presence_head(model, folder / PRESENCE_FILE)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: the weights leave {len(left)} tensors unset: {', '.join(left[:10])}")
    return model.to(device), tokenizer


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


#: XLM-R's special tokens, as `transformers` names them in a tokenizer config.
_SPECIAL_TOKENS = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                   "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}


def write_tokenizer_config(folder: str | os.PathLike) -> None:
    """Give a tokenizer folder the `tokenizer_config.json` (naming `XLMRobertaTokenizer`) and
    `special_tokens_map.json` that `AutoTokenizer.from_pretrained(folder)` needs: without them it
    reads `config.json`, whose model type `evf` it does not know. Added tokens (`[semantic]`, from
    `added_tokens.json`) are declared special with their ids. A config that names its class is kept."""
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class"):
        return
    added_file = folder / "added_tokens.json"
    added = json.loads(added_file.read_text()) if added_file.is_file() else {}
    config.update({"tokenizer_class": "XLMRobertaTokenizer", "padding_side": "right", **_SPECIAL_TOKENS})
    if added:
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for t, i in sorted(added.items(), key=lambda item: item[1])}
    special = dict(_SPECIAL_TOKENS)
    if added:
        special["additional_special_tokens"] = sorted(added, key=added.get)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    if not (folder / "special_tokens_map.json").is_file():
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def save_presence_head(model: nn.Module, path: str | os.PathLike) -> None:
    """The presence head's tensors (and its threshold, also as metadata) to a safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()
             if k.startswith(PRESENCE_PREFIX)}
    threshold = float(model.presence_head.threshold)
    save_file(state, str(path), metadata={"format": "pt", "threshold": repr(threshold),
                                          "about": "evfsam_lightning presence head (docs/no_target.md)"})


def load_presence_head(model: nn.Module, path: str | os.PathLike) -> float:
    """Load a `PRESENCE_FILE` into `model.presence_head`; returns the threshold."""
    if getattr(model, "presence_head", None) is None:
        raise CheckpointError(f"{path}: the model has no presence head to load it into")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    own = {k for k in model.state_dict() if k.startswith(PRESENCE_PREFIX)}
    if set(state) != own:
        raise CheckpointError(f"{path}: presence head keys {sorted(state)} do not match the model's {sorted(own)}")
    if "threshold" in meta:
        state[PRESENCE_PREFIX + "threshold"] = torch.tensor(float(meta["threshold"]))
    load_into(model, state, source=str(path), allow_missing=("beit3", "projector", "sam"))
    return float(model.presence_head.threshold)


def official_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the official key names, without what the reference model lacks
    (the presence head, which an export writes to `PRESENCE_FILE`)."""
    return {k: v for k, v in to_reference(model, model.state_dict()).items() if not k.startswith(PRESENCE_PREFIX)}


def export_reference(model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None, extra_state: Mapping[str, torch.Tensor] | None = None,
                     extra_files: Mapping[str, str] | None = None) -> Path:
    """Write `model` in the official layout: `model.safetensors` under official key names,
    `config.json` (official fields plus our full dimensions) and the tokenizer files, plus the
    text `extra_files` (name -> content: the model card). The folder is assembled under a temporary
    name and moved into place, so it is complete or absent; it follows the umask."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if any(k.endswith((".lora_a", ".lora_b")) for k in model.state_dict()):
        raise CheckpointError("the model has unmerged LoRA layers: merge them first (models.lora.merge_lora)")
    state = official_state(model)
    if extra_state:
        state.update(extra_state)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    cfg: EvfSamConfig = model.config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = _umask()
    try:
        save_file(state, str(tmp / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
        config = {
            "architectures": ["EvfSam2Model" if cfg.family == "sam2" else "EvfSamModel"],
            "model_type": "evf",
            "hidden_size": cfg.beit3.embed_dim,
            "out_dim": cfg.sam.prompt_dim,
            "sam_scale": "huge" if cfg.family == "sam" else "large",
            "mm_extractor_scale": "base" if cfg.beit3.embed_dim == 768 else "large",
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
            "torch_dtype": str(dtype or next(iter(state.values())).dtype).replace("torch.", ""),
            "evfsam_lightning": {"model": cfg.to_dict()},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "presence_head", None) is not None:  # ours only: the official code never opens it
            save_presence_head(model, tmp / PRESENCE_FILE)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
            if not (tmp / TOKENIZER_FILES[0]).is_file():
                raise CheckpointError(f"{tokenizer_dir}: no {TOKENIZER_FILES[0]} to export with the model")
            write_tokenizer_config(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / Path(name).name).write_text(text)
        # mkdtemp makes the folder private and safetensors its file: like save_pretrained, follow the umask.
        tmp.chmod(0o777 & ~umask)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

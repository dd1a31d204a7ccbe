"""Checkpoint loading shared by every model: .pth containers, .safetensors, Hugging Face folders/repo ids.

Nothing here unpickles arbitrary objects: ``torch.load`` always runs with ``weights_only=True`` and only
``argparse.Namespace`` (which the official containers store under ``args``) is allow-listed.
Model-specific knowledge (which key holds the state dict, aliases, dead weights) is passed in by the caller.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export_engine.errors import CheckpointError
from export_engine.hashing import sha256_file

log = logging.getLogger(__name__)

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
# A missing path with one of these suffixes is a missing file, never a Hugging Face repo id.
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the raw state dict plus what the container said about itself."""

    state_dict: dict[str, torch.Tensor]
    source: str
    sha256: str
    files: list[str] = field(default_factory=list)
    # Free-form facts from the container: "args_model" (constructor string), "hf_config" (dict), ...
    meta: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(source: str | Path, state_dict_keys: Sequence[str] = ("model",)) -> Checkpoint:
    """Load ``source``: a .pth/.pt/.bin container, a .safetensors file, an HF model folder or an HF repo id.

    ``state_dict_keys`` lists the container keys that may hold the state dict (first match wins); a
    container that is itself a flat ``{name: tensor}`` dict is accepted as well.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_folder(path, state_dict_keys)
    if path.is_file():
        return _load_file(path, state_dict_keys)
    if _HF_REPO_ID.match(text) and not text.startswith((".", "/")) and not text.lower().endswith(_FILE_SUFFIXES):
        return _load_folder(_hf_snapshot(text), state_dict_keys, source=f"hf:{text}")
    raise CheckpointError(
        f"checkpoint {text!r} not found: give a .pth/.safetensors file, a model folder, or a Hugging Face "
        f"repo id (owner/name)"
    )


def _load_file(path: Path, state_dict_keys: Sequence[str]) -> Checkpoint:
    digest = sha256_file(path)
    if path.suffix == ".safetensors":
        state_dict, meta = _read_safetensors(path), dict[str, Any]()
    else:
        state_dict, meta = _read_torch_container(path, state_dict_keys)
    return Checkpoint(state_dict, str(path), digest, [str(path)], meta)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({_short(err)}); it is truncated or "
            f"corrupt: download it again"
        ) from err


def _read_torch_container(path: Path, state_dict_keys: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = found.group(1) if found else "an object"
            raise CheckpointError(
                f"checkpoint {path} contains a pickled {what} that is not allowed with weights_only=True; "
                f"re-save it as a plain state dict (or .safetensors)"
            ) from err
        raise _corrupt(path, err) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise _corrupt(path, err) from err
    return _unwrap_container(obj, path, state_dict_keys)


def _can_mmap(path: Path) -> bool:
    # mmap only works on the zip format (torch >= 1.6); avoids holding two copies of a 2.7 GB file.
    return zipfile.is_zipfile(path)


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} could not be read ({_short(err)}); it is truncated or corrupt: download it again"
    )


def _unwrap_container(
    obj: object, path: Path, state_dict_keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors or a training "
            f"container with one of the keys {list(state_dict_keys)}"
        )
    meta: dict[str, Any] = {}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        meta["args"] = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool)}
        if isinstance(getattr(args, "model", None), str):
            meta["args_model"] = args.model
    for key in state_dict_keys:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return _tensors_only(inner, path), meta
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _tensors_only(obj, path), meta
    raise CheckpointError(
        f"checkpoint {path} has no state dict under any of {list(state_dict_keys)} (top-level keys: "
        f"{sorted(map(str, obj))[:8]}); is it a checkpoint of this model?"
    )


def _tensors_only(mapping: Mapping[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    bad = [str(k) for k, v in mapping.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: state dict entries are not tensors: {bad[:5]}")
    return {str(k): v for k, v in mapping.items()}


def _load_folder(folder: Path, state_dict_keys: Sequence[str], source: str | None = None) -> Checkpoint:
    weights = next((folder / name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"model folder {folder} has none of {list(_WEIGHT_FILES)}; point --checkpoint at the weights file"
        )
    ckpt = _load_file(weights, state_dict_keys)
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            ckpt.meta["hf_config"] = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON ({err}); download it again") from err
        ckpt.files.append(str(config_path))
    ckpt.source = source or str(folder)
    return ckpt


def _hf_snapshot(repo_id: str) -> Path:
    """Resolve an HF repo id through huggingface_hub's cache (offline first, then a download if allowed)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:
        raise CheckpointError(
            f"{repo_id!r} looks like a Hugging Face repo id but huggingface_hub is not installed: "
            f"pip install 'export-engine[hf]', or pass a local file"
        ) from err
    patterns = ["config.json", *_WEIGHT_FILES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise CheckpointError(
                f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it first"
            ) from None
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises many unrelated types (HTTP, OS, validation)
        raise CheckpointError(f"could not fetch {repo_id!r} from the Hugging Face hub: {_short(err)}") from err


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Key checking


def match_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | Sequence[int]],
    *,
    model_name: str,
    aliases: Mapping[str, str] | None = None,
    strip_prefixes: Iterable[str] = ("module.",),
) -> dict[str, torch.Tensor]:
    """Check ``state_dict`` against ``expected`` names/shapes and return a dict ready for strict loading.

    ``aliases`` maps alias name -> canonical name (both must exist in ``expected``); an alias missing from the
    checkpoint is filled from its canonical tensor (safetensors drops shared tensors), and an alias that is
    present must equal its canonical tensor. Raises :class:`CheckpointError` naming a few offending keys.
    """
    aliases = dict(aliases or {})
    sd = dict(state_dict)
    for prefix in strip_prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    for alias, canonical in aliases.items():
        if alias not in sd and canonical in sd:
            sd[alias] = sd[canonical]
        elif alias in sd and canonical not in sd:
            sd[canonical] = sd[alias]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        share = 1 - len(missing) / max(len(expected), 1)
        hint = (
            "these look like the weights of another model or configuration"
            if share < 0.5
            else "the checkpoint does not match this configuration; pass the matching --config"
        )
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{model_name} checkpoint keys do not match: {'; '.join(parts)}; {hint}")
    misshaped = [
        f"{k} {tuple(sd[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if tuple(sd[k].shape) != tuple(shape)
    ]
    if misshaped:
        raise CheckpointError(
            f"{model_name} checkpoint has {len(misshaped)} tensors of the wrong shape (e.g. "
            f"{'; '.join(misshaped[:3])}); pass the --config this checkpoint was trained with"
        )
    for alias, canonical in aliases.items():
        if sd[alias] is not sd[canonical] and not torch.equal(sd[alias], sd[canonical]):
            raise CheckpointError(
                f"{model_name} checkpoint: aliased keys {alias} and {canonical} hold different values; "
                f"the file is corrupt or was edited"
            )
    non_float = [k for k, v in sd.items() if not v.is_floating_point()]
    if non_float:
        raise CheckpointError(f"{model_name} checkpoint: non-float tensors where weights belong: {non_float[:3]}")
    return sd

"""Reading the files SAE formats are made of: JSON configs, safetensors, torch pickles, npz.

Every failure becomes an `SAELoadError` that names the file. Pickle-based files (.pt/.pth, .npz) are read
with `torch.load(weights_only=True)` / `np.load(allow_pickle=False)` first; full unpickling (which can run
arbitrary code) only happens when the operator passed `allow_pickle=True`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SAELoadError

PICKLE_HINT = (
    "pass allow_pickle=True to load it with full unpickling (this can execute arbitrary code: "
    "only do it for files you trust)"
)


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise SAELoadError(f"{path}: file not found", path)
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`."""
    require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"{path}: cannot read JSON config ({e})", path) from e
    if not isinstance(data, dict):
        raise SAELoadError(f"{path}: expected a JSON object, got {type(data).__name__}", path)
    return data


_MISSING = object()


def require_key(cfg: Mapping[str, Any], key: str, path: Path, *, where: str = "") -> Any:
    """cfg[key], or an SAELoadError naming the file and the (dotted) key."""
    value = cfg.get(key, _MISSING) if isinstance(cfg, Mapping) else _MISSING
    if value is _MISSING or value is None:
        raise SAELoadError(f"{path}: missing config key '{where}{key}'", path)
    return value


def require_int(cfg: Mapping[str, Any], key: str, path: Path, *, where: str = "") -> int:
    value = require_key(cfg, key, path, where=where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SAELoadError(f"{path}: config key '{where}{key}' must be an integer, got {value!r}", path)
    return int(value)


def require_float(cfg: Mapping[str, Any], key: str, path: Path, *, where: str = "") -> float:
    value = require_key(cfg, key, path, where=where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SAELoadError(f"{path}: config key '{where}{key}' must be a number, got {value!r}", path)
    return float(value)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on CPU)."""
    from safetensors.torch import load_file

    require_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or corrupt files
        raise SAELoadError(f"{path}: cannot read safetensors file, truncated or corrupt? ({e})", path) from e


def load_torch(path: Path, *, allow_pickle: bool) -> Any:
    """A torch.save'd object. weights_only=True unless the operator opted in with allow_pickle."""
    require_file(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a damaged pickle, not a refused global
            raise SAELoadError(
                f"{path}: cannot read torch checkpoint, truncated or corrupt? ({e})", path
            ) from e
        if not allow_pickle:
            raise SAELoadError(
                f"{path}: refusing to unpickle: torch.load(weights_only=True) cannot read it "
                f"({_weights_only_reason(e)}); {PICKLE_HINT}",
                path,
            ) from e
    except Exception as e:
        raise SAELoadError(f"{path}: cannot read torch checkpoint, truncated or corrupt? ({e})", path) from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise SAELoadError(
            f"{path}: cannot read torch checkpoint, truncated or corrupt? (with allow_pickle=True: {e})", path
        ) from e


def load_npz(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """All arrays of an .npz file as torch tensors. allow_pickle=False unless the operator opted in."""
    require_file(path)
    try:
        return _read_npz(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise SAELoadError(f"{path}: cannot read npz file, truncated or corrupt? ({e})", path) from e
        if not allow_pickle:
            raise SAELoadError(
                f"{path}: refusing to unpickle: the npz holds object arrays that need pickle; {PICKLE_HINT}",
                path,
            ) from e
    except Exception as e:
        raise SAELoadError(f"{path}: cannot read npz file, truncated or corrupt? ({e})", path) from e
    try:
        return _read_npz(path, allow_pickle=True)
    except Exception as e:
        raise SAELoadError(f"{path}: cannot read npz file even with allow_pickle=True ({e})", path) from e


def _read_npz(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with np.load(str(path), allow_pickle=allow_pickle) as data:
        for key in data.files:
            array = np.asarray(data[key])
            if array.dtype == object:  # only readable with allow_pickle; never a weight, so leave it out
                continue
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def as_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    """A loaded torch object that must be a flat state dict (str -> tensor/str/int/dict)."""
    if not isinstance(obj, Mapping):
        raise SAELoadError(
            f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}", path
        )
    return obj


def _weights_only_reason(e: BaseException) -> str:
    """The useful line of torch's long weights-only error, e.g. "Unsupported global: GLOBAL argparse.Namespace"."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    tail = text.split(marker, 1)[1] if marker in text else text
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[0].split(" was not an allowed global")[0] if lines else type(e).__name__

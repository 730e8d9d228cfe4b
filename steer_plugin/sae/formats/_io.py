"""Reading the files SAE formats are made of: JSON configs, safetensors, torch pickles, npz.

Every failure becomes an `SAELoadError` that names the file. Pickle-based files (.pt/.pth, .npz) are read
with `torch.load(weights_only=True)` / `np.load(allow_pickle=False)` first; full unpickling (which can run
arbitrary code) only happens when the operator passed `allow_pickle=True`.

Inside `shapes_only()` the three tensor readers return meta tensors (shape and dtype, no data) for every tensor
of more than one element, read from the file's header: safetensors' header, each .npy member's header in an
.npz, a memory-mapped torch.load (nothing paged in). One-element tensors (k buffers, scalar thresholds) are
read for real: loaders take config values from them. A format's loader then runs its config parsing and shape
checks as usual and yields an SAE of meta tensors (the API process's catalog; see steer_plugin.catalog).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steer_plugin.files import MAX_JSON_BYTES, FileRefused, open_regular, read_bounded, regular_path

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
    """A JSON object from `path` (read through steer_plugin.files: a regular file of bounded size)."""
    require_file(path)
    try:
        data = json.loads(read_bounded(path, MAX_JSON_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"{path}: cannot read JSON config ({e})", path) from e
    if not isinstance(data, dict):
        raise SAELoadError(f"{path}: expected a JSON object, got {type(data).__name__}", path)
    return data


_MISSING = object()
_SHAPES_ONLY: ContextVar[bool] = ContextVar("steer_plugin_sae_shapes_only", default=False)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors header dtype names -> torch dtypes (those a meta tensor can stand for)."""


@contextmanager
def shapes_only() -> Iterator[None]:
    """Within it (this thread or task), the tensor readers below return meta tensors: see the module doc."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _meta(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


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
        with regular_path(path) as opened:
            if _SHAPES_ONLY.get():
                return _safetensors_shapes(opened, path)
            return load_file(opened, device="cpu")
    except (SAELoadError, FileRefused):
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or corrupt files
        raise SAELoadError(f"{path}: cannot read safetensors file, truncated or corrupt? ({e})", path) from e


def _safetensors_shapes(opened: str, path: Path) -> dict[str, torch.Tensor]:
    """The header's tensors as meta tensors (safe_open checks the header covers the whole file)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(opened, framework="pt", device="cpu") as f:
        for name in f.keys():
            view = f.get_slice(name)
            shape, dtype = view.get_shape(), view.get_dtype()
            if dtype not in _SAFETENSORS_DTYPES:
                raise SAELoadError(
                    f"{path}: tensor '{name}' has dtype {dtype}, which torch cannot hold", path
                )
            n = 1
            for size in shape:
                n *= size
            out[name] = f.get_tensor(name) if n <= 1 else _meta(shape, _SAFETENSORS_DTYPES[dtype])
    return out


def load_torch(path: Path, *, allow_pickle: bool) -> Any:
    """A torch.save'd object. weights_only=True unless the operator opted in with allow_pickle."""
    require_file(path)
    try:
        with regular_path(path) as opened:
            if _SHAPES_ONLY.get():
                return _torch_shapes(opened, weights_only=True)
            return torch.load(opened, map_location="cpu", weights_only=True)
    except FileRefused:
        raise
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
        with regular_path(path) as opened:
            if _SHAPES_ONLY.get():
                return _torch_shapes(opened, weights_only=False)
            return torch.load(opened, map_location="cpu", weights_only=False)
    except FileRefused:
        raise
    except Exception as e:
        raise SAELoadError(
            f"{path}: cannot read torch checkpoint, truncated or corrupt? (with allow_pickle=True: {e})", path
        ) from e


def _torch_shapes(path: str, *, weights_only: bool) -> Any:
    """torch.load, memory-mapped (no tensor data is read), with the state dict's top-level tensors as meta
    tensors. Files in torch's legacy (pre-1.6, non-zip) format cannot be mapped: those are loaded in full once,
    and their tensors dropped after taking the shapes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    if isinstance(obj, Mapping):
        obj = {
            k: _meta(v.shape, v.dtype) if isinstance(v, torch.Tensor) and v.numel() > 1 else v
            for k, v in obj.items()
        }
    return obj


def load_npz(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """All arrays of an .npz file as torch tensors. allow_pickle=False unless the operator opted in."""
    require_file(path)
    try:
        return _read_npz(path, allow_pickle=False)
    except FileRefused:
        raise
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
    except FileRefused:
        raise
    except Exception as e:
        raise SAELoadError(f"{path}: cannot read npz file even with allow_pickle=True ({e})", path) from e


def _read_npz(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    with open_regular(path, None) as f:
        if _SHAPES_ONLY.get():
            return _npz_shapes(f, allow_pickle=allow_pickle)
        return _npz_arrays(f, allow_pickle=allow_pickle)


def _npz_arrays(file, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with np.load(file, allow_pickle=allow_pickle) as data:
        for key in data.files:
            array = np.asarray(data[key])
            if array.dtype == object:  # only readable with allow_pickle; never a weight, so leave it out
                continue
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def _npz_shapes(path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Each member's .npy header (magic, then shape and dtype) as a meta tensor; object arrays left out, as
    _read_npz does. Members of one element are read in full."""
    out: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            name = member[: -len(".npy")]
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
            if dtype.hasobject:  # as np.load: needs pickle (refused without allow_pickle), never a weight
                if not allow_pickle:
                    raise ValueError(f"{member}: Object arrays cannot be loaded when allow_pickle=False")
                continue
            if int(np.prod(shape)) <= 1:
                with archive.open(member) as f:
                    out[name] = torch.from_numpy(np.lib.format.read_array(f, allow_pickle=allow_pickle))
                continue
            out[name] = _meta(shape, torch.from_numpy(np.empty(0, dtype=dtype)).dtype)
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

"""`load_sae`: read an SAE checkpoint of any known format into the shared `SparseAutoencoder` layout;
`read_sae_header`: the same checkpoint's shapes, dtype and metadata without reading its weights."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from steer_plugin.files import FileRefused

from .errors import SAELoadError
from .formats import REGISTRY, SAEFormat
from .formats._io import shapes_only
from .model import SAEHeader, SparseAutoencoder


def load_sae(
    path: str | Path,
    format: str | None = None,
    *,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    **format_kwargs,
) -> SparseAutoencoder:
    """Load the SAE at `path` (a file or folder, as the format stores it).

    format: force a format by name (see `FORMATS`); detected from the files when None.
    allow_pickle: the operator's explicit opt-in to full unpickling of .pt/.pth/.npz files that cannot be
        read with torch.load(weights_only=True) / np.load(allow_pickle=False). Off by default.
    device, dtype: where the tensors end up; dtype None keeps the stored dtype of W_enc.
    format_kwargs: options of that format's loader (e.g. sparsify `hookpoint=`, Gemma Scope `layer=`).
    Raises SAELoadError (a ValueError) naming the file for every problem with the checkpoint.
    """
    sae = _load(Path(path).expanduser(), format, allow_pickle, format_kwargs)
    return sae.to(device=device, dtype=_dtype(dtype) or sae.W_enc.dtype)


def read_sae_header(
    path: str | Path, format: str | None = None, *, allow_pickle: bool = False, **format_kwargs
) -> SAEHeader:
    """What `load_sae(path, format, ...)` would load, without the tensors: d_in, d_sae, stored dtype,
    architecture, k and metadata (layer, hook, Neuronpedia id), from the configs and the tensor files' headers.

    The format's own loader runs, with the tensor files read as meta tensors (formats/_io.py `shapes_only`),
    so the configs, tensor names and shapes are checked exactly as `load_sae` checks them; what only the data
    shows (non-finite values, a damaged payload behind an intact header) is not. Raises SAELoadError naming
    the file, as load_sae does.
    """
    with shapes_only():
        sae = _load(Path(path).expanduser(), format, allow_pickle, format_kwargs)
    return sae.header()


def _load(path: Path, format: str | None, allow_pickle: bool, format_kwargs: dict) -> SparseAutoencoder:
    if not path.exists():
        raise SAELoadError(f"{path}: no such file or folder", path)
    fmt = _pick_format(path, format)
    _check_kwargs(fmt, format_kwargs, path)
    try:
        sae = fmt.load(path, allow_pickle=allow_pickle, **format_kwargs)
    except (SAELoadError, FileRefused):
        raise
    except Exception as e:  # a malformed checkpoint the checks did not anticipate: still name the path
        raise SAELoadError(f"{path}: failed to load as {fmt.name!r}: {type(e).__name__}: {e}", path) from e
    sae.metadata.format = fmt.name
    sae.metadata.source_path = str(path)
    return sae


def detect_format(path: str | Path) -> str:
    """Name of the format `path` is in, or SAELoadError."""
    path = Path(path).expanduser()
    return _pick_format(path, None).name


def _pick_format(path: Path, name: str | None) -> SAEFormat:
    known = ", ".join(REGISTRY)
    if name is not None:
        if name not in REGISTRY:
            raise SAELoadError(f"{path}: unknown SAE format {name!r}; known formats: {known}", path)
        return REGISTRY[name]
    matches = [fmt for fmt in REGISTRY.values() if fmt.detect(path)]
    if not matches:
        raise SAELoadError(
            f"{path}: unknown SAE format: the files match none of the known formats ({known}); "
            "pass format=... if you know it",
            path,
        )
    if len(matches) > 1:
        names = ", ".join(fmt.name for fmt in matches)
        raise SAELoadError(f"{path}: ambiguous SAE format, matches {names}; pass format=... to choose", path)
    return matches[0]


def _check_kwargs(fmt: SAEFormat, kwargs: dict, path: Path) -> None:
    params = inspect.signature(fmt.load).parameters
    accepted = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "allow_pickle"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise SAELoadError(
            f"{path}: format {fmt.name!r} does not take option(s) {', '.join(unknown)}"
            f" (it takes: {', '.join(sorted(accepted)) or 'none'})",
            path,
        )


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved

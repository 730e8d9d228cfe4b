"""Gemma Scope (1): `.../layer_L/width_16k/average_l0_N/params.npz`, JumpReLU, no config file.

Tensors W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold [d_sae] are in the shared layout.
The layer and width come from the path; b_dec is NOT subtracted from the input. The repo name in the path
(`gemma-scope-2b-pt-res`, `-mlp`, `-att`) says which site was hooked; residual stream when it is absent.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader
from ._hooks import layer_from_hook, resid_post_hook
from ._io import load_npz
from .registry import SAEFormat

PARAMS_FILE = "params.npz"
WIDTHS = {
    "4k": 4096,
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
"""Gemma Scope's width labels -> number of features."""

_REPO = re.compile(r"gemma-scope-(?:2-)?(\d+(?:\.\d+)?[mb])-(pt|it)-(res|mlp|att|transcoders)")


def parse_width(label: str | int | None) -> int | None:
    """`16k` -> 16384, `48` -> 48; None when unknown."""
    if label is None or isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    text = str(label).strip().lower()
    if text.isdigit():
        return int(text)
    return WIDTHS.get(text)


def detect(path: Path) -> bool:
    return (path.is_file() and path.name == PARAMS_FILE) or (path.is_dir() and (path / PARAMS_FILE).is_file())


def load(
    path: Path,
    *,
    allow_pickle: bool = False,
    layer: int | None = None,
    hook_name: str | None = None,
    model_name: str | None = None,
) -> SparseAutoencoder:
    """Load a Gemma Scope params.npz (the file or its folder).

    layer / hook_name / model_name: override what the path says (needed when the path lacks `layer_L`).
    """
    file = path / PARAMS_FILE if path.is_dir() else path
    text = file.absolute().as_posix()  # not resolve(): HF cache files are symlinks to blobs/<hash>
    layers = re.findall(r"(?:^|/)layer_(\d+)(?:/|$)", text)
    widths = re.findall(r"(?:^|/)width_([0-9]+[km]?)(?:/|$)", text)
    l0s = re.findall(r"(?:^|/)average_l0_(\d+)(?:/|$)", text)
    repo = _REPO.search(text)
    site = repo.group(3) if repo else None
    notes: list[str] = []

    if layer is None and hook_name is not None:
        layer = layer_from_hook(hook_name)
    elif layer is None and layers:
        layer = int(layers[-1])
    if layer is None and hook_name is None:
        raise SAELoadError(
            f"{file}: cannot tell the layer: no 'layer_L' folder in the path (pass layer=... or hook_name=...)",
            file,
        )
    if hook_name is None:
        if site in (None, "res"):
            hook_name = resid_post_hook(layer)  # type: ignore[arg-type]
            if site is None:
                notes.append(
                    "hook site not in the path (no gemma-scope-*-res/mlp/att): assumed residual stream"
                )
        else:
            hook_name = f"blocks.{layer}.hook_mlp_out" if site == "mlp" else f"blocks.{layer}.attn.hook_z"
            layer = None  # not a residual-stream read
    if model_name is None and repo:
        model_name = f"gemma-2-{repo.group(1)}" + ("-it" if repo.group(2) == "it" else "")

    tensors = load_npz(file, allow_pickle=allow_pickle)
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    reader = TensorReader(file, tensors)
    width = parse_width(widths[-1]) if widths else None
    if width is not None:
        reader.set_dim("d_sae", width, f"path 'width_{widths[-1]}'")
    elif widths:
        notes.append(f"width label 'width_{widths[-1]}' not recognised: d_sae taken from W_enc")

    W_enc = reader.require("W_enc", ("d_in", "d_sae"))  # [d_in, d_sae]
    return SparseAutoencoder(
        W_enc=W_enc,
        W_dec=reader.require("W_dec", ("d_sae", "d_in")),  # [d_sae, d_in]
        b_enc=reader.require("b_enc", ("d_sae",)),  # [d_sae]
        b_dec=reader.require("b_dec", ("d_in",)),  # [d_in]
        threshold=reader.require("threshold", ("d_sae",)),  # [d_sae]
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name=hook_name,
            layer=layer,
            model_name=model_name,
            extra={
                "width": widths[-1] if widths else None,
                "average_l0": int(l0s[-1]) if l0s else None,
                "notes": notes,
            },
        ),
    )


FORMAT = SAEFormat(
    name="gemma_scope",
    summary="Gemma Scope 1: layer_L/width_W/average_l0_N/params.npz (JumpReLU)",
    detect=detect,
    load=load,
)

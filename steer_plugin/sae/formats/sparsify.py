"""EleutherAI sparsify: one folder per hookpoint (`layers.N`, `layers.N.mlp`) with `cfg.json` + `sae.safetensors`.

Tensors: encoder.weight [d_sae, d_in] (a Linear weight: transposed here), encoder.bias [d_sae],
W_dec [d_sae, d_in] (already the shared layout; SAELens' converter transposes it, wrongly), b_dec [d_in].
Encode relu((x - b_dec) @ encoder.weight.T + encoder.bias), keep the top k; decode f @ W_dec + b_dec.
`layers.N` hooks the output of decoder layer N. A parent folder holding several hookpoints works too: pick
one with `hookpoint=` (or it is chosen automatically when there is only one).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader, transpose
from ._hooks import layer_from_hook, resid_post_hook
from ._io import load_safetensors, read_json, require_int
from .registry import SAEFormat

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def _is_hookpoint(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def hookpoints(folder: Path) -> list[str]:
    """Hookpoint folders directly under `folder`."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_hookpoint(p))


def detect(path: Path) -> bool:
    if path.is_file():
        return path.name in (CFG_FILE, WEIGHTS_FILE) and _is_hookpoint(path.parent)
    return path.is_dir() and (_is_hookpoint(path) or bool(hookpoints(path)))


def load(path: Path, *, allow_pickle: bool = False, hookpoint: str | None = None) -> SparseAutoencoder:
    """Load one sparsify hookpoint folder, or `hookpoint` from a folder holding several."""
    del allow_pickle  # safetensors only
    folder = _resolve(path.parent if path.is_file() else path, hookpoint)
    cfg_path = folder / CFG_FILE
    cfg = read_json(cfg_path)
    d_in = require_int(cfg, "d_in", cfg_path)
    num_latents = int(cfg.get("num_latents") or 0)
    d_sae = num_latents or d_in * require_int(cfg, "expansion_factor", cfg_path)
    k = require_int(cfg, "k", cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAELoadError(f"{cfg_path}: activation {activation!r} is not supported (topk)", cfg_path)
    for flag in ("transcode", "skip_connection", "signed"):
        if cfg.get(flag):
            raise SAELoadError(f"{cfg_path}: '{flag}: true' is not supported (only plain SAEs)", cfg_path)

    weights_path = folder / WEIGHTS_FILE
    reader = TensorReader(weights_path, load_safetensors(weights_path))
    reader.set_dim("d_in", d_in, f"{CFG_FILE} 'd_in'")
    reader.set_dim(
        "d_sae", d_sae, f"{CFG_FILE} 'num_latents'" if num_latents else f"{CFG_FILE} d_in*expansion_factor"
    )
    if reader.has("W_skip"):
        raise SAELoadError(
            f"{weights_path}: has a 'W_skip' skip connection, which is not supported", weights_path
        )

    name = folder.name
    layer = layer_from_hook(name)
    if layer is not None:
        hook_name = resid_post_hook(layer)
    elif name.startswith("layers.") and name.endswith(".mlp") and name[7:-4].isdigit():
        hook_name = f"blocks.{name[7:-4]}.hook_mlp_out"
    else:
        hook_name = name
    model_name = None
    parent_cfg = folder.parent / "config.json"
    if parent_cfg.is_file():
        model_name = read_json(parent_cfg).get("model")

    return SparseAutoencoder(
        W_enc=transpose(reader.require("encoder.weight", ("d_sae", "d_in"))),  # [d_in, d_sae]
        W_dec=reader.require("W_dec", ("d_sae", "d_in")),  # [d_sae, d_in]
        b_enc=reader.require("encoder.bias", ("d_sae",)),  # [d_sae]
        b_dec=reader.require("b_dec", ("d_in",)),  # [d_in]
        architecture="topk",
        k=k,
        apply_b_dec_to_input=True,
        metadata=SAEMetadata(
            hook_name=hook_name,
            layer=layer,
            model_name=model_name,
            extra={"config": cfg, "hookpoint": name},
        ),
    )


def _resolve(folder: Path, hookpoint: str | None) -> Path:
    if hookpoint is not None:
        # A hookpoint is one folder name (`layers.6`): never a path that leaves `folder`.
        if hookpoint in ("", ".", "..") or "/" in hookpoint or "\\" in hookpoint or "\0" in hookpoint:
            raise SAELoadError(
                f"{folder}: hookpoint {hookpoint!r} must be the name of a folder inside it (like layers.6)",
                folder,
            )
        target = folder / hookpoint
        if not _is_hookpoint(target):
            known = ", ".join(hookpoints(folder)) or "none"
            raise SAELoadError(f"{target}: no sparsify hookpoint {hookpoint!r} here (found: {known})", target)
        return target
    if _is_hookpoint(folder):
        return folder
    found = hookpoints(folder)
    if len(found) == 1:
        return folder / found[0]
    if not found:
        raise SAELoadError(
            f"{folder}: no {CFG_FILE} + {WEIGHTS_FILE} here or in a hookpoint subfolder", folder
        )
    raise SAELoadError(
        f"{folder}: holds several sparsify hookpoints ({', '.join(found)}); pass hookpoint=... to pick one",
        folder,
    )


FORMAT = SAEFormat(
    name="sparsify",
    summary=f"EleutherAI sparsify hookpoint folder: {CFG_FILE} + {WEIGHTS_FILE} (or a folder of them)",
    detect=detect,
    load=load,
)

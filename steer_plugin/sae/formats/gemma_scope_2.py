"""Gemma Scope 2: a folder with `config.json` and `params.safetensors`, JumpReLU, lowercase tensor names.

Tensors w_enc [d_in, d_sae], w_dec [d_sae, d_in], b_enc, b_dec, threshold are in the shared layout.
Config: `hf_hook_point_in` ("model.layers.L.output" = output of decoder layer L), `architecture: jump_relu`,
`width`, `l0`, optionally `model_name`. Transcoders (`hf_hook_point_out`, affine skip) are not SAEs: refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader
from ._hooks import layer_from_hook, resid_post_hook
from ._io import load_safetensors, read_json, require_key
from .gemma_scope import parse_width
from .registry import SAEFormat

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


def detect(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent if path.name in (CONFIG_FILE, PARAMS_FILE) else None
    return folder is not None and (folder / CONFIG_FILE).is_file() and (folder / PARAMS_FILE).is_file()


def load(path: Path, *, allow_pickle: bool = False) -> SparseAutoencoder:
    """Load a Gemma Scope 2 folder (or its config.json / params.safetensors)."""
    del allow_pickle  # safetensors only
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG_FILE
    cfg = read_json(cfg_path)
    architecture = require_key(cfg, "architecture", cfg_path)
    if architecture != "jump_relu":
        raise SAELoadError(
            f"{cfg_path}: architecture {architecture!r} is not supported (jump_relu)", cfg_path
        )
    hook_in = require_key(cfg, "hf_hook_point_in", cfg_path)
    hook_out = cfg.get("hf_hook_point_out")
    if hook_out not in (None, hook_in):
        raise SAELoadError(
            f"{cfg_path}: hf_hook_point_out={hook_out!r} differs from the input hook: a transcoder, not an SAE",
            cfg_path,
        )

    params_path = folder / PARAMS_FILE
    reader = TensorReader(params_path, load_safetensors(params_path))
    if reader.has("affine_skip_connection"):
        raise SAELoadError(
            f"{params_path}: has 'affine_skip_connection': a skip transcoder, not an SAE", params_path
        )
    width = parse_width(cfg.get("width"))
    if width is not None:
        reader.set_dim("d_sae", width, f"{CONFIG_FILE} 'width'")

    layer = layer_from_hook(hook_in)
    return SparseAutoencoder(
        W_enc=reader.require("w_enc", ("d_in", "d_sae")),  # [d_in, d_sae]
        W_dec=reader.require("w_dec", ("d_sae", "d_in")),  # [d_sae, d_in]
        b_enc=reader.require("b_enc", ("d_sae",)),  # [d_sae]
        b_dec=reader.require("b_dec", ("d_in",)),  # [d_in]
        threshold=reader.require("threshold", ("d_sae",)),  # [d_sae]
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name=resid_post_hook(layer) if layer is not None else hook_in,
            layer=layer,
            model_name=cfg.get("model_name"),
            extra={"config": cfg, "hf_hook_point_in": hook_in},
        ),
    )


FORMAT = SAEFormat(
    name="gemma_scope_2",
    summary=f"Gemma Scope 2 folder: {CONFIG_FILE} + {PARAMS_FILE} (JumpReLU, lowercase tensor names)",
    detect=detect,
    load=load,
)

"""Llama Scope (OpenMOSS lm-saes): a folder with `hyperparams.json` and `checkpoints/final.safetensors`.

Tensors: encoder.weight [d_sae, d] and decoder.weight [d, d_sae] (Linear weights: transposed here),
encoder.bias [d_sae], decoder.bias [d]. Config: d_model, d_sae, act_fn (jumprelu), a scalar
jump_relu_threshold, norm_activation ("dataset-wise"), dataset_average_activation_norm{in, out},
hook_point_in / hook_point_out. Dataset-wise norm: x_n = x * sqrt(d) / avg_norm_in; JumpReLU against the
scalar threshold in that space; decode, then multiply by avg_norm_out / sqrt(d).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader, transpose
from ._hooks import layer_from_hook
from ._io import load_safetensors, read_json, require_float, require_int, require_key
from .registry import SAEFormat

CONFIG_FILE = "hyperparams.json"
WEIGHTS_FILE = "checkpoints/final.safetensors"


def detect(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent if path.name == CONFIG_FILE else None
    return folder is not None and (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def load(path: Path, *, allow_pickle: bool = False) -> SparseAutoencoder:
    """Load a Llama Scope folder (or its hyperparams.json)."""
    del allow_pickle  # safetensors only
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG_FILE
    cfg = read_json(cfg_path)
    d_model = require_int(cfg, "d_model", cfg_path)
    act_fn = require_key(cfg, "act_fn", cfg_path)
    if act_fn not in ("jumprelu", "relu"):
        raise SAELoadError(f"{cfg_path}: act_fn {act_fn!r} is not supported (jumprelu, relu)", cfg_path)
    hook_in = require_key(cfg, "hook_point_in", cfg_path)
    hook_out = cfg.get("hook_point_out", hook_in)
    if hook_out != hook_in:
        raise SAELoadError(
            f"{cfg_path}: hook_point_out={hook_out!r} differs from hook_point_in: a transcoder, not an SAE",
            cfg_path,
        )

    in_scale = out_scale = 1.0
    norm = cfg.get("norm_activation", "dataset-wise")
    if norm == "dataset-wise":
        avg = require_key(cfg, "dataset_average_activation_norm", cfg_path)
        where = "dataset_average_activation_norm."
        in_scale = math.sqrt(d_model) / require_float(avg, "in", cfg_path, where=where)
        out_scale = require_float(avg, "out", cfg_path, where=where) / math.sqrt(d_model)
    elif norm not in ("none", None):
        raise SAELoadError(
            f"{cfg_path}: norm_activation {norm!r} is not supported (dataset-wise, none)", cfg_path
        )

    weights_path = folder / WEIGHTS_FILE
    reader = TensorReader(weights_path, load_safetensors(weights_path))
    reader.set_dim("d_in", d_model, f"{CONFIG_FILE} 'd_model'")
    reader.set_dim("d_sae", require_int(cfg, "d_sae", cfg_path), f"{CONFIG_FILE} 'd_sae'")
    W_enc = transpose(reader.require("encoder.weight", ("d_sae", "d_in")))  # [d_in, d_sae]
    threshold = None
    if act_fn == "jumprelu":
        theta = require_float(cfg, "jump_relu_threshold", cfg_path)
        # [d_sae], one scalar for all
        threshold = torch.full((W_enc.shape[1],), theta, dtype=W_enc.dtype, device=W_enc.device)
    b_dec = reader.get("decoder.bias", ("d_in",), optional=not cfg.get("use_decoder_bias", True))
    if b_dec is None:
        b_dec = torch.zeros(d_model, dtype=W_enc.dtype, device=W_enc.device)

    return SparseAutoencoder(
        W_enc=W_enc,
        W_dec=transpose(reader.require("decoder.weight", ("d_in", "d_sae"))),  # [d_sae, d_in]
        b_enc=reader.require("encoder.bias", ("d_sae",)),  # [d_sae]
        b_dec=b_dec,  # [d_in]
        architecture=act_fn,
        threshold=threshold,
        apply_b_dec_to_input=bool(cfg.get("apply_decoder_bias_to_pre_encoder", False)),
        in_scale=in_scale,
        out_scale=out_scale,
        metadata=SAEMetadata(
            hook_name=hook_in,
            layer=layer_from_hook(hook_in),
            model_name=cfg.get("model_name"),
            extra={"config": cfg},
        ),
    )


FORMAT = SAEFormat(
    name="llama_scope",
    summary=f"Llama Scope folder: {CONFIG_FILE} + {WEIGHTS_FILE} (JumpReLU, dataset-wise norm)",
    detect=detect,
    load=load,
)

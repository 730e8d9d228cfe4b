"""dictionary_learning (saprmarks): a folder with `ae.pt` (torch state dict) and `config.json`.

`config.json{trainer{dict_class, activation_dim, dict_size, k, layer, lm_name, submodule_name}}`;
`dict_class` picks the state-dict layout:
- AutoEncoder: bias [d] (= b_dec), encoder.weight [F, d] (transposed here), encoder.bias [F],
  decoder.weight [d, F] (transposed here); f = relu(W_e (x - b_dec) + b_e).
- AutoEncoderTopK: b_dec, encoder.*, decoder.weight, k, threshold; top-k of relu(W_e (x - b_dec) + b_e).
- BatchTopKSAE (and Matryoshka): same tensors; at inference f * [f > threshold] with a scalar threshold.
- JumpReluAutoEncoder: W_enc [d, F], W_dec [F, d], b_enc, b_dec, threshold [F]; b_dec NOT subtracted.
- GatedAutoEncoder: decoder_bias, encoder.weight, gate_bias, mag_bias, r_mag, decoder.weight.
Weights are taken as saved: `AutoEncoder.from_pretrained`'s optional decoder-norm folding is not applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader, transpose
from ._hooks import resid_post_hook
from ._io import as_state_dict, load_torch, read_json, require_int, require_key
from .registry import SAEFormat

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
DICT_CLASSES = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "TopK": "topk",
    "TopKSAE": "topk",
    "BatchTopKSAE": "batchtopk",
    "BatchTopK": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "JumpRelu": "jumprelu",
    "GatedAutoEncoder": "gated",
}
"""dict_class -> shared-layout architecture."""


def detect(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent if path.name in (WEIGHTS_FILE, CONFIG_FILE) else None
    return folder is not None and (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def load(path: Path, *, allow_pickle: bool = False) -> SparseAutoencoder:
    """Load a dictionary_learning folder (or its ae.pt)."""
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG_FILE
    cfg = read_json(cfg_path)
    trainer = require_key(cfg, "trainer", cfg_path)
    dict_class = require_key(trainer, "dict_class", cfg_path, where="trainer.")
    if dict_class not in DICT_CLASSES:
        raise SAELoadError(
            f"{cfg_path}: dict_class {dict_class!r} is not supported ({', '.join(DICT_CLASSES)})", cfg_path
        )
    architecture = DICT_CLASSES[dict_class]
    weights_path = folder / WEIGHTS_FILE
    state = as_state_dict(load_torch(weights_path, allow_pickle=allow_pickle), weights_path)
    reader = TensorReader(weights_path, state)
    reader.set_dim(
        "d_in", require_int(trainer, "activation_dim", cfg_path, where="trainer."), "trainer.activation_dim"
    )
    reader.set_dim(
        "d_sae", require_int(trainer, "dict_size", cfg_path, where="trainer."), "trainer.dict_size"
    )

    parts = _LAYOUTS[architecture](reader)
    k = None
    if architecture in ("topk", "batchtopk"):
        k = _read_k(state, trainer, weights_path, cfg_path)
    if architecture == "batchtopk":
        parts["threshold"] = reader.require("threshold", (), ("d_sae",))

    layer = trainer.get("layer")
    submodule = str(trainer.get("submodule_name") or "")
    resid = layer is not None and (not submodule or "resid" in submodule)
    return SparseAutoencoder(
        **parts,
        architecture=architecture,  # type: ignore[arg-type]
        k=k if architecture == "topk" else None,
        apply_b_dec_to_input=architecture != "jumprelu",
        metadata=SAEMetadata(
            hook_name=resid_post_hook(int(layer)) if resid else (submodule or None),
            layer=int(layer) if resid else None,
            model_name=trainer.get("lm_name"),
            extra={"config": cfg, "dict_class": dict_class, "k": k},
        ),
    )


def _linear_layout(reader: TensorReader, b_dec_name: str) -> dict[str, torch.Tensor]:
    return {
        "W_enc": transpose(reader.require("encoder.weight", ("d_sae", "d_in"))),  # [d_in, d_sae]
        "W_dec": transpose(reader.require("decoder.weight", ("d_in", "d_sae"))),  # [d_sae, d_in]
        "b_enc": reader.require("encoder.bias", ("d_sae",)),  # [d_sae]
        "b_dec": reader.require(b_dec_name, ("d_in",)),  # [d_in]
    }


def _jumprelu_layout(reader: TensorReader) -> dict[str, torch.Tensor]:
    return {
        "W_enc": reader.require("W_enc", ("d_in", "d_sae")),  # [d_in, d_sae]
        "W_dec": reader.require("W_dec", ("d_sae", "d_in")),  # [d_sae, d_in]
        "b_enc": reader.require("b_enc", ("d_sae",)),  # [d_sae]
        "b_dec": reader.require("b_dec", ("d_in",)),  # [d_in]
        "threshold": reader.require("threshold", ("d_sae",), ()),  # [d_sae]
    }


def _gated_layout(reader: TensorReader) -> dict[str, torch.Tensor]:
    W_enc = transpose(reader.require("encoder.weight", ("d_sae", "d_in")))  # [d_in, d_sae]
    return {
        "W_enc": W_enc,
        "W_dec": transpose(reader.require("decoder.weight", ("d_in", "d_sae"))),  # [d_sae, d_in]
        "b_enc": torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device),  # unused by gated SAEs
        "b_dec": reader.require("decoder_bias", ("d_in",)),  # [d_in]
        "b_gate": reader.require("gate_bias", ("d_sae",)),  # [d_sae]
        "b_mag": reader.require("mag_bias", ("d_sae",)),  # [d_sae]
        "r_mag": reader.require("r_mag", ("d_sae",)),  # [d_sae]
    }


_LAYOUTS = {
    "relu": lambda r: _linear_layout(r, "bias"),
    "topk": lambda r: _linear_layout(r, "b_dec"),
    "batchtopk": lambda r: _linear_layout(r, "b_dec"),
    "jumprelu": _jumprelu_layout,
    "gated": _gated_layout,
}


def _read_k(state: Any, trainer: dict, weights_path: Path, cfg_path: Path) -> int:
    """k from the state dict's `k` buffer, cross-checked against trainer.k."""
    stored = state.get("k")
    if isinstance(stored, torch.Tensor):
        stored = int(stored.item())
    configured = trainer.get("k")
    if stored is not None and configured is not None and int(configured) != stored:
        raise SAELoadError(
            f"{weights_path}: k={stored} disagrees with {cfg_path} trainer.k={configured}", weights_path
        )
    if stored is None:
        return require_int(trainer, "k", cfg_path, where="trainer.")
    return int(stored)


FORMAT = SAEFormat(
    name="dictionary_learning",
    summary=f"dictionary_learning folder: {WEIGHTS_FILE} + {CONFIG_FILE} (AutoEncoder, TopK, BatchTopK, JumpRelu, Gated)",
    detect=detect,
    load=load,
)

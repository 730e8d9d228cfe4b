"""Goodfire: a single `.pth` torch state dict (e.g. `Llama-3.1-8B-Instruct-SAE-l19.pth`), no config.

Tensors: encoder_linear.weight [d_sae, d] and decoder_linear.weight [d, d_sae] (Linear weights: transposed
here), encoder_linear.bias [d_sae], decoder_linear.bias [d]. f = relu(W_e x + b_e), b_dec NOT subtracted;
reads the residual stream after the layer in the file name (`-l19` = blocks.19.hook_resid_post).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader, transpose
from ._hooks import resid_post_hook
from ._io import as_state_dict, load_torch
from .registry import SAEFormat

_NAME = re.compile(r"^(?P<model>.+?)-SAE-l(?P<layer>\d+)\.pth?$", re.IGNORECASE)
KNOWN = {
    "Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "Llama-3.3-70B-Instruct": "meta-llama/Llama-3.3-70B-Instruct",
}
"""Goodfire file-name prefixes -> HF model ids."""


def detect(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".pth" or bool(_NAME.match(path.name)))


def load(
    path: Path, *, allow_pickle: bool = False, layer: int | None = None, model_name: str | None = None
) -> SparseAutoencoder:
    """Load a Goodfire .pth. layer / model_name override what the file name says."""
    state = as_state_dict(load_torch(path, allow_pickle=allow_pickle), path)
    reader = TensorReader(path, state)
    match = _NAME.match(path.name)
    if layer is None and match:
        layer = int(match.group("layer"))
    if model_name is None and match:
        model_name = KNOWN.get(match.group("model"), match.group("model"))
    return SparseAutoencoder(
        W_enc=transpose(reader.require("encoder_linear.weight", ("d_sae", "d_in"))),  # [d_in, d_sae]
        W_dec=transpose(reader.require("decoder_linear.weight", ("d_in", "d_sae"))),  # [d_sae, d_in]
        b_enc=reader.require("encoder_linear.bias", ("d_sae",)),  # [d_sae]
        b_dec=reader.require("decoder_linear.bias", ("d_in",)),  # [d_in]
        architecture="relu",
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name=resid_post_hook(layer) if layer is not None else None,
            layer=layer,
            model_name=model_name,
            extra={} if layer is not None else {"notes": ["layer not in the file name: pass layer=..."]},
        ),
    )


FORMAT = SAEFormat(
    name="goodfire",
    summary="Goodfire .pth torch state dict (encoder_linear / decoder_linear, ReLU)",
    detect=detect,
    load=load,
)

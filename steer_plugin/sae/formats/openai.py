"""OpenAI sparse_autoencoder: `{L}.pt`, a torch-saved state dict (GPT-2 small SAEs, "Scaling and evaluating").

Tensors: pre_bias [d_in] (= b_dec), encoder.weight [d_sae, d_in] (Linear weight: transposed here),
latent_bias [d_sae] (= b_enc), decoder.weight [d_in, d_sae] (transposed here); plus the strings
`activation` ("TopK" | "ReLU") and `activation_state_dict{k, postact_fn}`. As in the reference
`Autoencoder.from_state_dict`, TopK models LayerNorm the input ((x - mu) / (std + eps), unbiased std) and
decode (W_d f + pre_bias) * std + mu; ReLU models do not normalise.
The file name gives the layer; the folder name (resid_post_mlp, resid_post_attn, resid_delta_*) the site.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader, transpose
from ._hooks import layer_from_hook
from ._io import as_state_dict, load_torch
from .registry import SAEFormat

_FILE = re.compile(r"^(\d+)\.pt$")
_SITES = {
    "resid_post_mlp": "blocks.{L}.hook_resid_post",
    "resid_post_attn": "blocks.{L}.hook_resid_mid",
    "resid_delta_attn": "blocks.{L}.hook_attn_out",
    "resid_delta_mlp": "blocks.{L}.hook_mlp_out",
    "mlp_post_act": "blocks.{L}.mlp.hook_post",
}
"""OpenAI location names -> TransformerLens hooks."""


def detect(path: Path) -> bool:
    return path.is_file() and bool(_FILE.match(path.name))


def load(
    path: Path, *, allow_pickle: bool = False, layer: int | None = None, hook_name: str | None = None
) -> SparseAutoencoder:
    """Load `{L}.pt`. layer / hook_name override what the file and folder names say."""
    state = as_state_dict(load_torch(path, allow_pickle=allow_pickle), path)
    activation = state.get("activation", "ReLU")
    act_state = state.get("activation_state_dict") or {}
    k = None
    if activation == "TopK":
        if "k" not in act_state:
            raise SAELoadError(f"{path}: missing 'activation_state_dict.k' for a TopK autoencoder", path)
        k = int(act_state["k"].item() if isinstance(act_state["k"], torch.Tensor) else act_state["k"])
        if act_state.get("postact_fn", "ReLU") != "ReLU":
            raise SAELoadError(
                f"{path}: TopK postact_fn {act_state.get('postact_fn')!r} is not supported", path
            )
    elif activation != "ReLU":
        raise SAELoadError(f"{path}: activation {activation!r} is not supported (TopK, ReLU)", path)

    reader = TensorReader(path, state)
    W_enc = transpose(reader.require("encoder.weight", ("d_sae", "d_in")))  # [d_in, d_sae]
    sae_kwargs = dict(
        W_enc=W_enc,
        W_dec=transpose(reader.require("decoder.weight", ("d_in", "d_sae"))),  # [d_sae, d_in]
        b_enc=reader.require("latent_bias", ("d_sae",)),  # [d_sae]
        b_dec=reader.require("pre_bias", ("d_in",)),  # [d_in]
    )

    notes: list[str] = []
    site = next((s for s in _SITES if s in path.as_posix()), None)
    if hook_name is None:
        match = _FILE.match(path.name)
        file_layer = layer if layer is not None else int(match.group(1)) if match else None
        if file_layer is None:
            raise SAELoadError(f"{path}: cannot tell the layer from the file name (pass layer=...)", path)
        if site is None:
            notes.append(
                "hook site not in the path: assumed resid_post_mlp (residual stream after the layer)"
            )
        hook_name = _SITES[site or "resid_post_mlp"].format(L=file_layer)
        layer = layer_from_hook(hook_name)
    elif layer is None:
        layer = layer_from_hook(hook_name)

    return SparseAutoencoder(
        **sae_kwargs,
        architecture="topk" if k else "relu",
        k=k,
        apply_b_dec_to_input=True,
        per_token_norm="layer_norm" if k else "none",
        metadata=SAEMetadata(
            hook_name=hook_name,
            layer=layer,
            extra={"activation": activation, "site": site, "notes": notes},
        ),
    )


FORMAT = SAEFormat(
    name="openai",
    summary="OpenAI sparse_autoencoder: {L}.pt torch state dict (TopK with LayerNorm'd input, or ReLU)",
    detect=detect,
    load=load,
)

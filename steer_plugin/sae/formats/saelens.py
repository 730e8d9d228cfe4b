"""SAELens checkpoints: a folder with `cfg.json` and `sae_weights.safetensors` (optional `sparsity.safetensors`).

Handles SAELens >= 6 configs (`architecture`, `metadata{hook_name, model_name, neuronpedia_id, ...}`) and the
legacy < 6 ones (flat `hook_name`/`hook_point`, `hook_layer`, `activation_fn_str` + `activation_fn_kwargs{k}`,
a `scaling_factor` tensor, `apply_b_dec_to_input` defaulting to true), the way SAELens' own
`handle_pre_6_0_config` reads them. Tensors are already in the shared layout: W_enc [d_in, d_sae],
W_dec [d_sae, d_in]; gated SAEs have b_gate/b_mag/r_mag and no b_enc.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SAELoadError
from ..model import SAEMetadata, SparseAutoencoder
from ._checks import TensorReader
from ._hooks import layer_from_hook
from ._io import load_safetensors, read_json, require_int
from .registry import SAEFormat

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_ARCHITECTURES = {
    "standard": "relu",
    "relu": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "gated": "gated",
}
_NORMS = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}


@dataclass
class SAELensConfig:
    """The parts of an SAELens cfg.json that change the maths or say where the SAE reads."""

    d_in: int
    """Width of the hooked activation."""
    d_sae: int
    """Number of features."""
    architecture: str
    """Shared-layout architecture (standard -> relu)."""
    k: int | None = None
    """TopK: features kept per token (`k`, legacy `activation_fn_kwargs.k`)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec before encoding; SAELens (and legacy configs) default to true."""
    normalize_activations: str = "none"
    """none | expected_average_only_in | layer_norm | constant_norm_rescale (legacy bool true = expected_average_only_in)."""
    rescale_acts_by_decoder_norm: bool = False
    """TopK: rank and scale pre-activations by the decoder row norms (folded into the weights on load)."""
    hook_name: str | None = None
    """TransformerLens hook (`metadata.hook_name`, legacy flat `hook_name` / `hook_point`)."""
    model_name: str | None = None
    neuronpedia_id: str | None = None
    center_writing_weights: bool = False
    """Trained on TransformerLens activations with centred writing weights (model_from_pretrained_kwargs)."""
    legacy: bool = False
    """Config written by SAELens < 6."""
    notes: list[str] = field(default_factory=list)


def detect(path: Path) -> bool:
    folder = _folder(path)
    return folder is not None and (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def load(
    path: Path,
    *,
    allow_pickle: bool = False,
    norm_scaling_factor: float | None = None,
    center_input: bool | None = None,
    normalize_activations: str | None = None,
) -> SparseAutoencoder:
    """Load an SAELens folder.

    norm_scaling_factor: for `normalize_activations: expected_average_only_in`, the dataset-wise input scale
        (SAELens keeps it in pretrained_saes.yaml, not in cfg.json); without it the SAE runs unscaled.
    center_input: override the config's center_writing_weights (subtract the per-token mean before encoding).
    normalize_activations: override the config's (SAELens' registry does so for some releases).
    """
    del allow_pickle  # safetensors only
    folder = _folder(path) or path
    cfg_path = folder / CFG_FILE
    raw = read_json(cfg_path)
    cfg = parse_config(raw, cfg_path)
    if normalize_activations is not None:
        cfg.normalize_activations = normalize_activations
    weights_path = folder / WEIGHTS_FILE
    reader = TensorReader(weights_path, load_safetensors(weights_path))
    reader.set_dim("d_in", cfg.d_in, f"{CFG_FILE} 'd_in'")
    reader.set_dim("d_sae", cfg.d_sae, f"{CFG_FILE} 'd_sae'")

    W_enc = reader.require("W_enc", ("d_in", "d_sae"))  # [d_in, d_sae]
    W_dec = reader.require("W_dec", ("d_sae", "d_in"))  # [d_sae, d_in]
    b_dec = reader.require("b_dec", ("d_in",))  # [d_in]
    gated = {}
    if cfg.architecture == "gated":
        gated = {n: reader.require(n, ("d_sae",)) for n in ("b_gate", "b_mag", "r_mag")}  # [d_sae] each
        b_enc = torch.zeros(cfg.d_sae, dtype=W_enc.dtype, device=W_enc.device)  # unused by gated SAEs
    else:
        b_enc = reader.require("b_enc", ("d_sae",))  # [d_sae]
    threshold = reader.require("threshold", ("d_sae",), ()) if cfg.architecture == "jumprelu" else None

    for name in ("scaling_factor", "finetuning_scaling_factor"):  # legacy: decode uses (f * s) @ W_dec
        scale = reader.get(name, ("d_sae",), optional=True)
        if scale is not None and (scale.is_meta or not torch.all(scale == 1)):  # meta: shapes only, fold
            W_dec = W_dec * scale.to(W_dec.dtype)[:, None]
            cfg.notes.append(f"folded tensor '{name}' into W_dec rows")

    if cfg.architecture == "topk" and cfg.rescale_acts_by_decoder_norm:
        # SAELens: pre *= |W_dec row|; decode (f / |W_dec row|) @ W_dec. Same maths with the norms folded in.
        norms = W_dec.norm(dim=-1)  # [d_sae]
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]

    in_scale = out_scale = 1.0
    per_token_norm = "none"
    if cfg.normalize_activations == "expected_average_only_in":
        factor = norm_scaling_factor if norm_scaling_factor is not None else raw.get("norm_scaling_factor")
        if factor is None:
            cfg.notes.append(
                "normalize_activations=expected_average_only_in without a norm_scaling_factor: running unscaled"
            )
        else:
            in_scale, out_scale = float(factor), 1.0 / float(factor)
    elif cfg.normalize_activations in _NORMS:
        per_token_norm = _NORMS[cfg.normalize_activations]
    else:
        raise SAELoadError(
            f"{cfg_path}: normalize_activations={cfg.normalize_activations!r} is not supported", cfg_path
        )

    return SparseAutoencoder(
        W_enc=W_enc,
        W_dec=W_dec,
        b_enc=b_enc,
        b_dec=b_dec,
        architecture=cfg.architecture,  # type: ignore[arg-type]
        threshold=threshold,
        k=cfg.k,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        in_scale=in_scale,
        out_scale=out_scale,
        per_token_norm=per_token_norm,  # type: ignore[arg-type]
        center_input=cfg.center_writing_weights if center_input is None else center_input,
        **gated,
        metadata=SAEMetadata(
            hook_name=cfg.hook_name,
            layer=layer_from_hook(cfg.hook_name),
            model_name=cfg.model_name,
            neuronpedia_id=cfg.neuronpedia_id,
            extra={"config": raw, "sae_lens_legacy": cfg.legacy, "notes": cfg.notes},
        ),
    )


def parse_config(raw: dict[str, Any], path: Path) -> SAELensConfig:
    """Read a cfg.json of any SAELens version into `SAELensConfig`."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}

    def get(key: str) -> Any:  # v6 keeps these under metadata, < 6 at top level
        value = meta.get(key)
        return raw.get(key) if value is None else value

    version = get("sae_lens_version")
    legacy = _major(version) < 6
    activation = raw.get("activation_fn_str", raw.get("activation_fn"))
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    arch_name = raw.get("architecture") or ("standard" if legacy else None)
    if arch_name is None:
        raise SAELoadError(f"{path}: missing config key 'architecture'", path)
    if activation == "topk":
        arch_name = "topk"
    elif activation not in (None, "relu"):
        raise SAELoadError(f"{path}: activation_fn {activation!r} is not supported (relu, topk)", path)
    if arch_name not in _ARCHITECTURES:
        raise SAELoadError(
            f"{path}: SAELens architecture {arch_name!r} is not supported ({', '.join(_ARCHITECTURES)})", path
        )
    architecture = _ARCHITECTURES[arch_name]
    k = None
    if architecture == "topk":
        if raw.get("k") is not None:
            k = require_int(raw, "k", path)
        else:
            k = require_int(act_kwargs, "k", path, where="activation_fn_kwargs.")
    norm = raw.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        norm = "expected_average_only_in" if norm else "none"
    hook_name = get("hook_name") or raw.get("hook_point")
    notes = []
    if get("hook_head_index") is not None:
        notes.append(f"hook_head_index={get('hook_head_index')}: reads one attention head")
    pretrained_kwargs = get("model_from_pretrained_kwargs") or {}
    return SAELensConfig(
        d_in=require_int(raw, "d_in", path),
        d_sae=require_int(raw, "d_sae", path),
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=str(norm),
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        hook_name=hook_name,
        model_name=get("model_name"),
        neuronpedia_id=get("neuronpedia_id"),
        center_writing_weights=pretrained_kwargs.get("center_writing_weights") is True,
        legacy=legacy,
        notes=notes,
    )


def _major(version: Any) -> int:
    """Major version of an SAELens version string; missing or unreadable -> legacy (0)."""
    if not isinstance(version, str):
        return 0
    head = version.strip().lstrip("v").split(".")[0]
    return int(head) if head.isdigit() else 0


def _folder(path: Path) -> Path | None:
    if path.is_dir():
        return path
    if path.name in (CFG_FILE, WEIGHTS_FILE, "sparsity.safetensors"):
        return path.parent
    return None


FORMAT = SAEFormat(
    name="saelens",
    summary=f"SAELens folder: {CFG_FILE} + {WEIGHTS_FILE} (SAELens >= 6 and legacy < 6 configs)",
    detect=detect,
    load=load,
)

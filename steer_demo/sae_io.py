"""Stage 5: write (and read back) the SAE in the SAELens >= 6 on-disk format.

``cfg.json`` mirrors what SAELens 6 ``TopKSAEConfig.to_dict()`` writes (``d_in``, ``d_sae``, ``dtype``,
``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``metadata``,
``k``, ``rescale_acts_by_decoder_norm``, ``architecture``). ``metadata.sae_lens_version`` is what makes
SAELens treat the folder as the 6.x format (anything older, or missing, is run through its pre-6
converter); we did not train with SAELens, so it is set to the format version ``"6.0.0"`` and
``sae_lens_training_version`` is ``None``.

``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``, all float32. ``sparsity.safetensors``: ``sparsity [d_sae]`` = log10 feature density
(+1e-10, as SAELens computes it) on the held-out tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import HOOK_NAME, LAYER, NEURONPEDIA_ID, write_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
HF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_cfg(d_in: int, d_sae: int, k: int, context_size: int) -> dict:
    return {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": HF_MODEL_ID,
            "model_class_name": "LlamaForCausalLM",
            "hook_name": HOOK_NAME,
            "hook_layer": LAYER,
            "hf_hook_name": f"model.layers.{LAYER}",
            "hook_head_index": None,
            "neuronpedia_id": NEURONPEDIA_ID,
            "context_size": context_size,
            "prepend_bos": False,
            "seqpos_slice": [1, None],
            "exclude_special_tokens": False,
            "dataset_path": "local: steer_demo offline corpus (see quality.json)",
            "model_from_pretrained_kwargs": {},
            "training_architecture": "topk",
            "trained_with": "steer_demo.train_sae (plain torch, AuxK)",
        },
        "k": k,
        "rescale_acts_by_decoder_norm": False,
        "architecture": "topk",
    }


def save_sae(state: dict, out_dir: Path, k: int, context_size: int) -> dict:
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    w = {
        name: state[name].detach().to(torch.float32).contiguous()
        for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    d_in, d_sae = w["W_enc"].shape
    assert w["W_dec"].shape == (d_sae, d_in) and w["b_enc"].shape == (d_sae,) and w["b_dec"].shape == (d_in,)
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(w, str(tmp))
    tmp.chmod(0o644)  # safetensors creates files 0600
    tmp.replace(out_dir / WEIGHTS_FILE)
    cfg = make_cfg(d_in, d_sae, k, context_size)
    write_json(out_dir / CFG_FILE, cfg)
    return cfg


def save_sparsity(log10_density, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = out_dir / (SPARSITY_FILE + ".tmp")
    save_file({"sparsity": log10_density.to(torch.float32).contiguous()}, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(out_dir / SPARSITY_FILE)


def load_sae(sae_dir: Path) -> tuple[dict, dict]:
    """(cfg, tensors) from a folder written by :func:`save_sae`; shapes are checked."""
    from safetensors.torch import load_file

    with open(sae_dir / CFG_FILE, encoding="utf-8") as f:
        cfg = json.load(f)
    w = load_file(str(sae_dir / WEIGHTS_FILE))
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expect = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in expect.items():
        if tuple(w[name].shape) != shape:
            raise ValueError(
                f"{sae_dir / WEIGHTS_FILE}: {name} has shape {tuple(w[name].shape)}, expected {shape}"
            )
    return cfg, w


def encode_topk(x, cfg: dict, w: dict):
    """SAELens topk encode: returns (values [N, k] relu'd, indices [N, k])."""
    import torch

    xin = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = xin @ w["W_enc"] + w["b_enc"]
    vals, idx = torch.topk(pre, cfg["k"], dim=-1, sorted=False)
    return vals.relu(), idx


def decode_sparse(vals, idx, w: dict):
    import torch

    return (
        torch.nn.functional.embedding_bag(idx, w["W_dec"], per_sample_weights=vals, mode="sum") + w["b_dec"]
    )

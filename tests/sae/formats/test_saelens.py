"""SAELens format: cfg.json + sae_weights.safetensors, SAELens >= 6 and legacy (< 6) configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.sae import load_sae

D_IN, D_SAE = 16, 48
ATOL = 1e-5


def v6_config(architecture: str, **overrides) -> dict:
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "architecture": architecture,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gpt2-small",
            "hook_name": "blocks.7.hook_resid_post",
            "neuronpedia_id": "gpt2-small/7-res-test",
            "sae_lens_version": "6.5.0",
            "sae_lens_training_version": "6.5.0",
            "prepend_bos": True,
        },
    }
    cfg.update(overrides)
    return cfg


def raw_tensors(rand, architecture: str) -> dict[str, torch.Tensor]:
    """Random weights with the on-disk names of SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""
    t = {
        "W_enc": rand(D_IN, D_SAE, scale=0.3),
        "W_dec": rand(D_SAE, D_IN, scale=0.3),
        "b_dec": rand(D_IN, scale=0.2),
    }
    if architecture == "gated":
        t.update(b_gate=rand(D_SAE, scale=0.5), b_mag=rand(D_SAE, scale=0.5), r_mag=rand(D_SAE, scale=0.3))
    else:
        t["b_enc"] = rand(D_SAE, scale=0.5)
    if architecture == "jumprelu":
        t["threshold"] = rand(D_SAE).abs()
    return t


def write(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def reference(raw: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor):
    """SAELens' encode/decode written out from the raw tensors: returns (features, reconstruction)."""
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if act == "topk":
        arch = "topk"
    norm = cfg.get("normalize_activations") or "none"
    W_enc, W_dec, b_dec = raw["W_enc"], raw["W_dec"], raw["b_dec"]
    sae_in = x
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        sae_in = (x - mu) / (std + 1e-5)
    elif norm == "constant_norm_rescale":
        coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
        sae_in = x * coeff
    if cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - b_dec
    dec_norm = W_dec.norm(dim=-1)
    if arch == "gated":
        gate = (sae_in @ W_enc + raw["b_gate"] > 0).float()
        f = gate * torch.relu(sae_in @ (W_enc * raw["r_mag"].exp()) + raw["b_mag"])
    else:
        pre = sae_in @ W_enc + raw["b_enc"]
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "jumprelu":
            f = torch.relu(pre) * (pre > raw["threshold"])
        else:  # topk
            if cfg.get("rescale_acts_by_decoder_norm"):
                pre = pre * dec_norm
            values, idx = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    g = f / dec_norm if cfg.get("rescale_acts_by_decoder_norm") else f
    if "scaling_factor" in raw:
        g = g * raw["scaling_factor"]
    out = g @ W_dec + b_dec
    if norm == "layer_norm":
        out = out * std + mu
    elif norm == "constant_norm_rescale":
        out = out / coeff
    return f, out


def check_against(sae, raw, cfg, x):
    f_ref, out_ref = reference(raw, cfg, x)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any(), "test data should switch some features on and some off"
    torch.testing.assert_close(f, f_ref, atol=ATOL, rtol=1e-5)
    _, state = sae.normalise(x)
    torch.testing.assert_close(sae.decode(f_ref, state), out_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), out_ref, atol=ATOL, rtol=1e-5)


CASES = {
    "relu": ("standard", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 6}),
    "topk_rescaled": ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    "gated": ("gated", {}),
    "layer_norm": ("standard", {"normalize_activations": "layer_norm"}),
    "constant_norm_rescale": ("standard", {"normalize_activations": "constant_norm_rescale"}),
    "no_b_dec_to_input": ("jumprelu", {"apply_b_dec_to_input": False}),
}


@pytest.fixture(params=sorted(CASES))
def v6_case(request, tmp_path, rand):
    arch, overrides = CASES[request.param]
    cfg = v6_config(arch, **overrides)
    raw = raw_tensors(rand, arch)
    return write(tmp_path / request.param, cfg, raw), cfg, raw


def test_v6_matches_formula(v6_case, x):
    folder, cfg, raw = v6_case
    sae = load_sae(folder)
    assert sae.metadata.format == "saelens"
    check_against(sae, raw, cfg, x)


def test_v6_matches_saelens_library(v6_case, x, saelens_ref):
    folder, cfg, raw = v6_case
    ours = load_sae(folder)
    theirs = saelens_ref.SAE.load_from_disk(folder)
    with torch.no_grad():
        f = theirs.encode(x)
        out = theirs.decode(f)
    torch.testing.assert_close(ours.encode(x), f, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours.reconstruct(x), out, atol=ATOL, rtol=1e-5)


def test_v6_metadata(tmp_path, rand):
    cfg = v6_config("standard")
    sae = load_sae(write(tmp_path / "sae", cfg, raw_tensors(rand, "standard")))
    meta = sae.metadata
    assert (meta.hook_name, meta.layer, meta.model_name) == ("blocks.7.hook_resid_post", 7, "gpt2-small")
    assert meta.neuronpedia_id == "gpt2-small/7-res-test"
    assert meta.source_path == str(tmp_path / "sae")
    assert sae.architecture == "relu" and sae.apply_b_dec_to_input and sae.b_enc.shape == (D_SAE,)


def legacy_config(**overrides) -> dict:
    """A SAELens 3.x-style config: flat hook fields, no architecture / apply_b_dec_to_input / version."""
    cfg = {
        "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre",
        "hook_point_layer": 8,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cpu",
        "normalize_activations": False,
    }
    cfg.update(overrides)
    return cfg


def test_legacy_defaults(tmp_path, rand, x):
    """No apply_b_dec_to_input key -> true; hook_point resid_pre L -> output of layer L-1."""
    cfg = legacy_config()
    raw = raw_tensors(rand, "standard")
    sae = load_sae(write(tmp_path / "legacy", cfg, raw))
    assert sae.apply_b_dec_to_input is True
    assert sae.architecture == "relu"
    assert (sae.metadata.hook_name, sae.metadata.layer) == ("blocks.8.hook_resid_pre", 7)
    assert sae.metadata.extra["sae_lens_legacy"] is True
    check_against(sae, raw, cfg, x)


def test_legacy_topk_with_scaling_factor(tmp_path, rand, x):
    """activation_fn_str topk + activation_fn_kwargs{k}; a non-trivial scaling_factor scales decode."""
    cfg = legacy_config(
        hook_point=None,
        hook_name="blocks.4.hook_resid_post",
        hook_layer=4,
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 5},
        finetuning_scaling_factor=True,
        neuronpedia_id="gpt2-small/4-res-legacy",
        sae_lens_version="4.3.1",
    )
    raw = raw_tensors(rand, "standard")
    raw["scaling_factor"] = 1 + rand(D_SAE, scale=0.3).abs()
    sae = load_sae(write(tmp_path / "legacy_topk", cfg, raw))
    assert (sae.architecture, sae.k, sae.metadata.layer) == ("topk", 5, 4)
    assert sae.metadata.neuronpedia_id == "gpt2-small/4-res-legacy"
    check_against(sae, raw, cfg, x)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_legacy_matches_saelens_library(tmp_path, rand, x, saelens_ref, activation):
    cfg = legacy_config(
        activation_fn_str=activation, activation_fn_kwargs={"k": 5} if activation == "topk" else {}
    )
    raw = raw_tensors(rand, "standard")
    raw["scaling_factor"] = torch.ones(D_SAE)  # SAELens 6 only accepts an all-ones legacy scaling_factor
    folder = write(tmp_path / "legacy", cfg, raw)
    theirs = saelens_ref.SAE.load_from_disk(folder)
    with torch.no_grad():
        f = theirs.encode(x)
        out = theirs.decode(f)
    ours = load_sae(folder)
    torch.testing.assert_close(ours.encode(x), f, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours.reconstruct(x), out, atol=ATOL, rtol=1e-5)


def test_expected_average_only_in_with_factor(tmp_path, rand, x):
    """normalize_activations=expected_average_only_in: the factor scales the input, 1/factor the output."""
    cfg = v6_config("standard", normalize_activations="expected_average_only_in")
    raw = raw_tensors(rand, "standard")
    folder = write(tmp_path / "eao", cfg, raw)
    unscaled = load_sae(folder)
    assert unscaled.in_scale == 1.0 and unscaled.metadata.extra["notes"]
    sae = load_sae(folder, norm_scaling_factor=2.5)
    f_ref = torch.relu((2.5 * x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"])
    torch.testing.assert_close(sae.encode(x), f_ref, atol=ATOL, rtol=1e-5)
    _, state = sae.normalise(x)
    torch.testing.assert_close(sae.decode(f_ref, state), (f_ref @ raw["W_dec"] + raw["b_dec"]) / 2.5)


def test_center_writing_weights(tmp_path, rand, x):
    cfg = v6_config("standard")
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"center_writing_weights": True}
    raw = raw_tensors(rand, "standard")
    sae = load_sae(write(tmp_path / "centred", cfg, raw))
    assert sae.center_input is True
    xc = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(sae.encode(x), torch.relu((xc - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"]))

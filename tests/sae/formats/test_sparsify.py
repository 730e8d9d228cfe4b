"""EleutherAI sparsify: hookpoint folders (layers.N) with cfg.json + sae.safetensors, TopK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE, K = 16, 48, 6


def write(folder: Path, rand, **cfg_overrides) -> dict[str, torch.Tensor]:
    """sparsify's save_to_disk layout: encoder.weight [M, d] (a Linear), W_dec [M, d], b_dec [d]."""
    raw = {
        "encoder.weight": rand(D_SAE, D_IN, scale=0.3),
        "encoder.bias": rand(D_SAE, scale=0.5),
        "W_dec": rand(D_SAE, D_IN, scale=0.3),
        "b_dec": rand(D_IN, scale=0.2),
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
        **cfg_overrides,
    }
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(raw, str(folder / "sae.safetensors"))
    return raw


def reference(raw: dict[str, torch.Tensor], x: torch.Tensor):
    """relu((x - b_dec) enc^T + b), top k; decode sum_i vals_i W_dec[idx_i] + b_dec."""
    pre = torch.relu((x - raw["b_dec"]) @ raw["encoder.weight"].T + raw["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    out = (vals.unsqueeze(-1) * raw["W_dec"][idx]).sum(-2) + raw["b_dec"]
    return f, out


def test_matches_formula(tmp_path, rand, x):
    raw = write(tmp_path / "layers.3", rand)
    sae = load_sae(tmp_path / "layers.3")
    f_ref, out_ref = reference(raw, x)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) == K).all()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.decode(f_ref), out_ref)
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("sparsify", 3, "blocks.3.hook_resid_post")
    assert (sae.architecture, sae.k) == ("topk", K)


def test_parent_folder_and_hookpoint(tmp_path, rand):
    write(tmp_path / "layers.3", rand)
    write(tmp_path / "layers.3.mlp", rand)
    (tmp_path / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    with pytest.raises(SAELoadError, match=r"layers\.3, layers\.3\.mlp.*hookpoint="):
        load_sae(tmp_path)
    mlp = load_sae(tmp_path, hookpoint="layers.3.mlp")
    assert (mlp.metadata.hook_name, mlp.metadata.layer) == ("blocks.3.hook_mlp_out", None)
    assert mlp.metadata.model_name == "EleutherAI/pythia-70m"
    with pytest.raises(SAELoadError, match="layers.9"):
        load_sae(tmp_path, hookpoint="layers.9")


def test_num_latents_zero_uses_expansion_factor(tmp_path, rand):
    write(tmp_path / "layers.0", rand, num_latents=0, expansion_factor=3)
    assert load_sae(tmp_path / "layers.0").d_sae == 3 * D_IN


def test_transposed_W_dec_is_caught(tmp_path, rand):
    """SAELens' sparsify converter transposes W_dec; here a [d, M] W_dec is a named error."""
    raw = write(tmp_path / "layers.1", rand)
    raw["W_dec"] = raw["W_dec"].T.contiguous()
    save_file(raw, str(tmp_path / "layers.1" / "sae.safetensors"))
    with pytest.raises(
        SAELoadError, match=r"sae\.safetensors: tensor 'W_dec' has shape \[16, 48\].*transposed"
    ):
        load_sae(tmp_path / "layers.1")


@pytest.mark.parametrize("flag", [{"activation": "groupmax"}, {"transcode": True}, {"skip_connection": True}])
def test_unsupported_variants(tmp_path, rand, flag):
    write(tmp_path / "layers.2", rand, **flag)
    with pytest.raises(SAELoadError, match=r"cfg\.json"):
        load_sae(tmp_path / "layers.2")


def test_matches_sparsify_library(tmp_path, rand, x, sparsify_ref):
    write(tmp_path / "layers.3", rand)
    theirs = sparsify_ref.SparseCoder.load_from_disk(tmp_path / "layers.3")
    ours = load_sae(tmp_path / "layers.3")
    flat = x.reshape(-1, D_IN)
    with torch.no_grad():
        enc = theirs.encode(flat)
        out = theirs.decode(enc.top_acts, enc.top_indices)
    f_theirs = torch.zeros(flat.shape[0], D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(ours.encode(flat), f_theirs)
    torch.testing.assert_close(ours.reconstruct(flat), out)

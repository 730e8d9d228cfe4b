"""Gemma Scope 2: config.json + params.safetensors with lowercase tensor names, JumpReLU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE = 16, 48
FOLDER = "resid_post/layer_5_width_48_l0_small"


def write(folder: Path, rand, **cfg_overrides) -> dict[str, torch.Tensor]:
    raw = {
        "w_enc": rand(D_IN, D_SAE, scale=0.3),
        "w_dec": rand(D_SAE, D_IN, scale=0.3),
        "b_enc": rand(D_SAE, scale=0.5),
        "b_dec": rand(D_IN, scale=0.2),
        "threshold": rand(D_SAE).abs(),
    }
    cfg = {
        "architecture": "jump_relu",
        "hf_hook_point_in": "model.layers.5.output",
        "width": D_SAE,
        "l0": 20,
        "model_name": "gemma-v3-270m-pt",
        **cfg_overrides,
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(raw, str(folder / "params.safetensors"))
    return raw


def reference(raw: dict[str, torch.Tensor], x: torch.Tensor):
    pre = x @ raw["w_enc"] + raw["b_enc"]
    f = (pre > raw["threshold"]) * torch.relu(pre)
    return f, f @ raw["w_dec"] + raw["b_dec"]


def test_matches_formula(tmp_path, rand, x):
    raw = write(tmp_path / FOLDER, rand)
    sae = load_sae(tmp_path / FOLDER)
    f_ref, out_ref = reference(raw, x)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.decode(f_ref), out_ref)
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("gemma_scope_2", 5, "blocks.5.hook_resid_post")
    assert meta.model_name == "gemma-v3-270m-pt" and meta.extra["hf_hook_point_in"] == "model.layers.5.output"


def test_width_label(tmp_path, rand):
    write(tmp_path / "sae", rand, width="16k")
    with pytest.raises(
        SAELoadError, match=r"'w_enc' has shape \[16, 48\], expected .*16384.*config\.json 'width'"
    ):
        load_sae(tmp_path / "sae")


def test_transcoder_refused(tmp_path, rand):
    write(
        tmp_path / "tc",
        rand,
        hf_hook_point_in="model.layers.5.pre_feedforward_layernorm.output",
        hf_hook_point_out="model.layers.5.post_feedforward_layernorm.output",
    )
    with pytest.raises(SAELoadError, match="transcoder"):
        load_sae(tmp_path / "tc")


def test_missing_architecture_key(tmp_path, rand):
    folder = tmp_path / "sae"
    write(folder, rand)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architecture"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match=r"config\.json: missing config key 'architecture'"):
        load_sae(folder)


def test_matches_saelens_gemma_3_converter(tmp_path, rand, x, saelens_ref, monkeypatch):
    """SAELens' own Gemma Scope 2 converter (hub access redirected to the local files) agrees with us."""
    write(tmp_path / FOLDER, rand)
    loaders = saelens_ref.loaders

    def fake_download(repo_id, filename, subfolder=None, **kw):
        return str(tmp_path / (subfolder or "") / filename)

    def fake_shapes(repo_id, filename):
        with safe_open(str(tmp_path / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", fake_shapes)

    def converter(path, device="cpu", cfg_overrides=None):
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt", FOLDER, device)
        return cfg, state

    theirs = saelens_ref.SAE.load_from_disk(tmp_path, converter=converter)
    ours = load_sae(tmp_path / FOLDER)
    with torch.no_grad():
        f = theirs.encode(x)
        out = theirs.decode(f)
    torch.testing.assert_close(ours.encode(x), f)
    torch.testing.assert_close(ours.decode(f), out)
    assert ours.metadata.hook_name == theirs.cfg.metadata.hook_name

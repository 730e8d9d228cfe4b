"""Gemma Scope 1: .../layer_L/width_W/average_l0_N/params.npz, JumpReLU, b_dec not subtracted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE = 16, 48
REPO = "gemma-scope-2b-pt-res"


def write_npz(folder: Path, rand, d_sae: int = D_SAE) -> dict[str, np.ndarray]:
    raw = {
        "W_enc": rand(D_IN, d_sae, scale=0.3).numpy(),
        "W_dec": rand(d_sae, D_IN, scale=0.3).numpy(),
        "b_enc": rand(d_sae, scale=0.5).numpy(),
        "b_dec": rand(D_IN, scale=0.2).numpy(),
        "threshold": np.abs(rand(d_sae).numpy()),
    }
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **raw)
    return raw


def reference(raw: dict[str, np.ndarray], x: torch.Tensor):
    """Gemma Scope's JumpReLU: mask(pre > threshold) * relu(pre), pre = x W_enc + b_enc (no b_dec)."""
    t = {k: torch.from_numpy(v) for k, v in raw.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    f = (pre > t["threshold"]) * torch.relu(pre)
    return f, f @ t["W_dec"] + t["b_dec"]


def test_matches_formula_and_path_metadata(tmp_path, rand, x):
    folder = tmp_path / REPO / "layer_3" / f"width_{D_SAE}" / "average_l0_7"
    raw = write_npz(folder, rand)
    sae = load_sae(folder / "params.npz")
    f_ref, out_ref = reference(raw, x)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.decode(f_ref), out_ref)
    assert sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("gemma_scope", 3, "blocks.3.hook_resid_post")
    assert meta.model_name == "gemma-2-2b" and meta.extra["average_l0"] == 7


def test_width_label_from_path(tmp_path, rand):
    """width_4k means 4096 features; the folder (not just the file) loads too."""
    folder = tmp_path / "layer_12" / "width_4k" / "average_l0_40"
    write_npz(folder, rand, d_sae=4096)
    sae = load_sae(folder)
    assert (sae.d_in, sae.d_sae, sae.metadata.layer) == (D_IN, 4096, 12)
    assert sae.metadata.extra["notes"]  # no repo name in the path: residual stream assumed, and said so


def test_hf_cache_symlink(tmp_path, rand):
    """In the HF cache the file is a symlink into blobs/: layer and width come from the link's path."""
    write_npz(tmp_path / "blobs_src", rand)
    (tmp_path / "blobs").mkdir()
    blob = tmp_path / "blobs" / "0123abcd"
    (tmp_path / "blobs_src" / "params.npz").rename(blob)
    snapshot = (
        tmp_path
        / "models--google--gemma-scope-2b-pt-res"
        / "snapshots"
        / "f00"
        / "layer_8"
        / "width_48"
        / "average_l0_3"
    )
    snapshot.mkdir(parents=True)
    (snapshot / "params.npz").symlink_to(blob)
    meta = load_sae(snapshot / "params.npz").metadata
    assert (meta.layer, meta.hook_name, meta.model_name) == (8, "blocks.8.hook_resid_post", "gemma-2-2b")


def test_width_mismatch_names_path_width(tmp_path, rand):
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_7"
    write_npz(folder, rand)
    with pytest.raises(SAELoadError, match=r"params\.npz: tensor 'W_enc' has shape \[16, 48\].*width_16k"):
        load_sae(folder)


def test_mlp_site_is_not_residual(tmp_path, rand):
    folder = tmp_path / "gemma-scope-9b-it-mlp" / "layer_5" / f"width_{D_SAE}" / "average_l0_20"
    write_npz(folder, rand)
    meta = load_sae(folder).metadata
    assert (meta.hook_name, meta.layer, meta.model_name) == ("blocks.5.hook_mlp_out", None, "gemma-2-9b-it")


def test_layer_needed_when_path_lacks_it(tmp_path, rand):
    write_npz(tmp_path / "somewhere", rand)
    with pytest.raises(SAELoadError, match="layer"):
        load_sae(tmp_path / "somewhere")
    assert load_sae(tmp_path / "somewhere", layer=9).metadata.hook_name == "blocks.9.hook_resid_post"


def test_matches_saelens_gemma_2_converter(tmp_path, rand, x, saelens_ref, monkeypatch):
    """SAELens' own Gemma Scope converter (hub download redirected to the local file) agrees with us."""
    folder_name = f"layer_3/width_{D_SAE}/average_l0_7"
    write_npz(tmp_path / folder_name, rand)
    loaders = saelens_ref.loaders
    monkeypatch.setattr(
        loaders,
        "hf_hub_download",
        lambda repo_id, filename, subfolder, **kw: str(tmp_path / subfolder / filename),
    )

    def converter(path, device="cpu", cfg_overrides=None):
        cfg, state, _ = loaders.gemma_2_sae_huggingface_loader(
            "google/gemma-scope-2b-pt-res", folder_name, device, cfg_overrides={"d_in": D_IN, "d_sae": D_SAE}
        )
        return cfg, state

    theirs = saelens_ref.SAE.load_from_disk(tmp_path, converter=converter)
    ours = load_sae(tmp_path / folder_name)
    with torch.no_grad():
        f = theirs.encode(x)
        out = theirs.decode(f)
    torch.testing.assert_close(ours.encode(x), f)
    torch.testing.assert_close(ours.decode(f), out)
    assert ours.metadata.hook_name == theirs.cfg.metadata.hook_name

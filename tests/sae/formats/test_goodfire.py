"""Goodfire: a .pth state dict with encoder_linear / decoder_linear; ReLU, b_dec not subtracted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE = 16, 48
NAME = "Llama-3.1-8B-Instruct-SAE-l19.pth"


def write(path: Path, rand) -> dict[str, torch.Tensor]:
    state = {
        "encoder_linear.weight": rand(D_SAE, D_IN, scale=0.3),
        "encoder_linear.bias": rand(D_SAE, scale=0.5),
        "decoder_linear.weight": rand(D_IN, D_SAE, scale=0.3),
        "decoder_linear.bias": rand(D_IN, scale=0.2),
    }
    torch.save(state, path)
    return state


def reference(s: dict[str, torch.Tensor], x: torch.Tensor):
    f = torch.relu(torch.nn.functional.linear(x, s["encoder_linear.weight"], s["encoder_linear.bias"]))
    return f, torch.nn.functional.linear(f, s["decoder_linear.weight"], s["decoder_linear.bias"])


def test_matches_formula(tmp_path, rand, x):
    state = write(tmp_path / NAME, rand)
    sae = load_sae(tmp_path / NAME)
    f_ref, out_ref = reference(state, x)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.decode(f_ref), out_ref)
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("goodfire", 19, "blocks.19.hook_resid_post")
    assert meta.model_name == "meta-llama/Llama-3.1-8B-Instruct"


def test_layer_option(tmp_path, rand):
    write(tmp_path / "sae.pth", rand)
    assert load_sae(tmp_path / "sae.pth").metadata.layer is None
    assert load_sae(tmp_path / "sae.pth", layer=7).metadata.hook_name == "blocks.7.hook_resid_post"


def test_missing_tensor(tmp_path, rand):
    state = write(tmp_path / NAME, rand)
    del state["decoder_linear.bias"]
    torch.save(state, tmp_path / NAME)
    with pytest.raises(SAELoadError, match=rf"{NAME}: missing tensor 'decoder_linear\.bias'"):
        load_sae(tmp_path / NAME)


def test_matches_saelens_goodfire_converter(tmp_path, rand, x, saelens_ref, monkeypatch):
    write(tmp_path / NAME, rand)
    loaders = saelens_ref.loaders
    monkeypatch.setattr(loaders, "hf_hub_download", lambda repo_id, filename, **kw: str(tmp_path / filename))

    def converter(path, device="cpu", cfg_overrides=None):
        cfg, state, _ = loaders.get_goodfire_huggingface_loader(
            "Goodfire/Llama-3.1-8B-Instruct-SAE-l19",
            NAME,
            device,
            cfg_overrides={"d_in": D_IN, "d_sae": D_SAE},
        )
        return cfg, state

    theirs = saelens_ref.SAE.load_from_disk(tmp_path, converter=converter)
    ours = load_sae(tmp_path / NAME)
    with torch.no_grad():
        f = theirs.encode(x)
        out = theirs.decode(f)
    torch.testing.assert_close(ours.encode(x), f)
    torch.testing.assert_close(ours.decode(f), out)
    assert ours.metadata.hook_name == theirs.cfg.metadata.hook_name

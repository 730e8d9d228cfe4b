"""Llama Scope: hyperparams.json + checkpoints/final.safetensors, JumpReLU with dataset-wise norm.

No reference library comparison: lm-saes is a heavy training stack, and SAELens' Llama Scope converter
multiplies the JumpReLU threshold by sqrt(d)/norm_in while the pre-activation it is compared with is the same
as here (the input scale is folded into W_enc), so it disagrees with the formula in docs/sae-formats.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE = 16, 48
NORM_IN, NORM_OUT, THETA = 9.0, 5.0, 0.6


def write(folder: Path, rand, **cfg_overrides) -> dict[str, torch.Tensor]:
    raw = {
        "encoder.weight": rand(D_SAE, D_IN, scale=0.3),
        "encoder.bias": rand(D_SAE, scale=0.5),
        "decoder.weight": rand(D_IN, D_SAE, scale=0.3),
        "decoder.bias": rand(D_IN, scale=0.2),
    }
    cfg = {
        "d_model": D_IN,
        "d_sae": D_SAE,
        "hook_point_in": "blocks.11.hook_resid_post",
        "hook_point_out": "blocks.11.hook_resid_post",
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "act_fn": "jumprelu",
        "jump_relu_threshold": THETA,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_OUT},
        "top_k": 50,
        **cfg_overrides,
    }
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(cfg))
    save_file(raw, str(folder / "checkpoints" / "final.safetensors"))
    return raw


def reference(raw: dict[str, torch.Tensor], x: torch.Tensor):
    """x_hat = x sqrt(d) / norm_in; jumprelu(x_hat enc^T + b) with the scalar theta; decode * norm_out / sqrt(d)."""
    x_hat = x * math.sqrt(D_IN) / NORM_IN
    pre = torch.nn.functional.linear(x_hat, raw["encoder.weight"], raw["encoder.bias"])
    f = torch.relu(pre) * (pre > THETA)
    out = torch.nn.functional.linear(f, raw["decoder.weight"], raw["decoder.bias"])
    return f, out * NORM_OUT / math.sqrt(D_IN)


def test_dataset_wise_norm_matches_formula(tmp_path, rand, x):
    raw = write(tmp_path / "L11R", rand)
    sae = load_sae(tmp_path / "L11R")
    f_ref, out_ref = reference(raw, 3 * x)
    f = sae.encode(3 * x)
    pre = torch.nn.functional.linear(
        3 * x * math.sqrt(D_IN) / NORM_IN, raw["encoder.weight"], raw["encoder.bias"]
    )
    assert (f > 0).any() and ((pre > 0) & (pre <= THETA)).any(), (
        "the threshold should switch some features off"
    )
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.decode(f_ref), out_ref)
    torch.testing.assert_close(sae.reconstruct(3 * x), out_ref)
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("llama_scope", 11, "blocks.11.hook_resid_post")


def test_missing_norm_key(tmp_path, rand):
    write(tmp_path / "sae", rand, dataset_average_activation_norm={"in": NORM_IN})
    with pytest.raises(
        SAELoadError, match=r"hyperparams\.json: missing config key 'dataset_average_activation_norm\.out'"
    ):
        load_sae(tmp_path / "sae")


def test_transcoder_refused(tmp_path, rand):
    write(
        tmp_path / "tc",
        rand,
        hook_point_in="blocks.8.ln2.hook_normalized",
        hook_point_out="blocks.8.hook_mlp_out",
    )
    with pytest.raises(SAELoadError, match="transcoder"):
        load_sae(tmp_path / "tc")


def test_d_sae_from_config_checked(tmp_path, rand):
    write(tmp_path / "sae", rand, d_sae=64)
    with pytest.raises(
        SAELoadError, match=r"final\.safetensors: tensor 'encoder\.weight'.*d_sae=64 from hyperparams"
    ):
        load_sae(tmp_path / "sae")

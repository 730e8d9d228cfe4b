"""OpenAI sparse_autoencoder: {L}.pt state dict; TopK models LayerNorm their input, ReLU models do not.

The reference implementation (github.com/openai/sparse_autoencoder) is not on PyPI, so its maths is written
out here from the raw state dict: LN(x) = (x - mu) / (std + 1e-5) with torch's default (unbiased) std,
latents = act(enc(x - pre_bias) + latent_bias), recons = (dec(latents) + pre_bias) * std + mu.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE, K = 16, 48, 6


def write(path: Path, rand, activation: str = "TopK") -> dict:
    """A state dict as Autoencoder.state_dict() saves it, including its non-tensor entries."""
    state = {
        "pre_bias": rand(D_IN, scale=0.2),
        "encoder.weight": rand(D_SAE, D_IN, scale=0.3),  # nn.Linear(n_inputs, n_latents).weight
        "latent_bias": rand(D_SAE, scale=0.5),
        "decoder.weight": rand(D_IN, D_SAE, scale=0.3),  # nn.Linear(n_latents, n_inputs).weight
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def reference(state: dict, x: torch.Tensor):
    normalize = state["activation"] == "TopK"
    mu = std = None
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = torch.nn.functional.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    if normalize:
        top = torch.topk(pre, k=K, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        f = torch.relu(pre)
    out = torch.nn.functional.linear(f, state["decoder.weight"]) + state["pre_bias"]
    return f, out * std + mu if normalize else out


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_matches_formula(tmp_path, rand, x, activation):
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "5.pt"
    state = write(path, rand, activation)
    sae = load_sae(path)  # loads with weights_only=True: no allow_pickle needed
    f_ref, out_ref = reference(state, x)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.reconstruct(x), out_ref)
    assert sae.per_token_norm == ("layer_norm" if activation == "TopK" else "none")
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("openai", 5, "blocks.5.hook_resid_post")


def test_site_from_folder_name(tmp_path, rand):
    path = tmp_path / "resid_post_attn_v5_32k" / "autoencoders" / "2.pt"
    write(path, rand)
    meta = load_sae(path).metadata
    assert (meta.hook_name, meta.layer) == ("blocks.2.hook_resid_mid", None)


def test_transposed_decoder_is_caught(tmp_path, rand):
    path = tmp_path / "3.pt"
    state = write(path, rand)
    state["decoder.weight"] = state["decoder.weight"].T.contiguous()
    torch.save(state, path)
    with pytest.raises(
        SAELoadError, match=r"3\.pt: tensor 'decoder\.weight' has shape \[48, 16\].*transposed"
    ):
        load_sae(path)

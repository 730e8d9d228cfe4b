"""SparseAutoencoder: the shared layout's encode/decode maths, validation and tensor handling."""

from __future__ import annotations

import pytest
import torch

from steer_plugin.sae import SparseAutoencoder

D_IN, D_SAE = 16, 48


def make(rand, **kwargs) -> SparseAutoencoder:
    base = dict(
        W_enc=rand(D_IN, D_SAE, scale=0.3),
        W_dec=rand(D_SAE, D_IN, scale=0.3),
        b_enc=rand(D_SAE, scale=0.5),
        b_dec=rand(D_IN, scale=0.2),
    )
    base.update(kwargs)
    return SparseAutoencoder(**base)


def test_layer_norm_is_openai_ln(rand, x):
    """(x - mu) / (std + 1e-5) with the unbiased std, decode * std + mu: OpenAI's LN and SAELens' layer_norm."""
    sae = make(rand, apply_b_dec_to_input=True, per_token_norm="layer_norm")
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)  # torch default: unbiased
    x_n, state = sae.normalise(x)
    torch.testing.assert_close(x_n, (x - mu) / (std + 1e-5))
    f = torch.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.decode(f, state), (f @ sae.W_dec + sae.b_dec) * std + mu)


def test_constant_norm_rescale(rand, x):
    sae = make(rand, per_token_norm="constant_norm_rescale")
    coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
    f = torch.relu(x * coeff @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.reconstruct(x), (f @ sae.W_dec + sae.b_dec) / coeff)


def test_center_input_maps_back_to_residual_space(rand, x):
    sae = make(rand, center_input=True)
    mu = x.mean(-1, keepdim=True)
    f = torch.relu((x - mu) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.reconstruct(x), f @ sae.W_dec + sae.b_dec + mu)


def test_dataset_scales(rand, x):
    sae = make(rand, in_scale=2.0, out_scale=0.25)
    f = torch.relu(2.0 * x @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.reconstruct(x), 0.25 * (f @ sae.W_dec + sae.b_dec))


def test_batchtopk_scalar_threshold_broadcasts(rand, x):
    sae = make(rand, architecture="batchtopk", threshold=torch.tensor(0.4))
    assert sae.threshold.shape == (D_SAE,)
    pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > 0.4))


def test_topk_keeps_k(rand, x):
    sae = make(rand, architecture="topk", k=5)
    f = sae.encode(x)
    assert ((f != 0).sum(-1) <= 5).all()
    pre = x @ sae.W_enc + sae.b_enc
    top = pre.topk(5, dim=-1)
    torch.testing.assert_close(f, torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()))


def test_gated(rand, x):
    b_gate, b_mag, r_mag = rand(D_SAE), rand(D_SAE), rand(D_SAE, scale=0.3)
    sae = make(rand, architecture="gated", b_gate=b_gate, b_mag=b_mag, r_mag=r_mag, apply_b_dec_to_input=True)
    xc = x - sae.b_dec
    f = (xc @ sae.W_enc + b_gate > 0).float() * torch.relu(xc @ (sae.W_enc * r_mag.exp()) + b_mag)
    torch.testing.assert_close(sae.encode(x), f)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"architecture": "softmax"}, "unknown SAE architecture"),
        ({"architecture": "jumprelu"}, "needs a threshold"),
        ({"architecture": "topk"}, "k > 0"),
        ({"architecture": "gated"}, "b_gate, b_mag and r_mag"),
    ],
)
def test_validation(rand, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(rand, **kwargs)


def test_to_and_nbytes(rand):
    sae = make(rand, architecture="jumprelu", threshold=rand(D_SAE))
    assert sae.nbytes() == 4 * (2 * D_IN * D_SAE + 2 * D_SAE + D_IN)
    sae.to(dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in sae.tensors().values())
    assert (sae.d_in, sae.d_sae, sae.dtype) == (D_IN, D_SAE, torch.float64)

"""The op's batched math against the reference adapter's per-token, per-op definitions (small tensors)."""

import pytest
import torch
from steer_adapters.hf.reference import token_delta

from steer_plugin.catalog import LoadedAssets, LoadedSAE, LoadedVector
from steer_plugin.config import SteerConfig
from steer_plugin.engine.bank import build_layer_bank
from steer_plugin.engine.delta import ALL_TERMS, DeltaTerms, add_delta, working_set_weights
from steer_plugin.request.wire import POSITION_CODES, ResolvedOp
from steer_plugin.sae.model import SparseAutoencoder

D_IN, D_SAE = 16, 40


def random_sae(architecture: str, seed: int = 0, **kwargs) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if architecture in ("jumprelu", "batchtopk"):
        extra["threshold"] = torch.rand(D_SAE, generator=g) * 0.3
    if architecture == "topk":
        extra["k"] = 5
    if architecture == "gated":
        extra |= {
            "b_gate": torch.randn(D_SAE, generator=g) * 0.1,
            "b_mag": torch.randn(D_SAE, generator=g) * 0.1,
            "r_mag": torch.randn(D_SAE, generator=g) * 0.1,
        }
    return SparseAutoencoder(
        W_enc=torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        W_dec=torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
        b_enc=torch.randn(D_SAE, generator=g) * 0.1,
        b_dec=torch.randn(D_IN, generator=g) * 0.1,
        architecture=architecture,
        **extra,
        **kwargs,
    )


SAE_CASES = {
    "relu": dict(architecture="relu"),
    "relu_bdec": dict(architecture="relu", apply_b_dec_to_input=True),
    "jumprelu": dict(architecture="jumprelu"),
    "topk": dict(architecture="topk", apply_b_dec_to_input=True),
    "batchtopk": dict(architecture="batchtopk"),
    "gated": dict(architecture="gated", apply_b_dec_to_input=True),
    "dataset_scaled": dict(architecture="jumprelu", in_scale=1.7, out_scale=0.6),
    "layer_norm": dict(architecture="topk", per_token_norm="layer_norm", apply_b_dec_to_input=True),
    "constant_norm": dict(architecture="relu", per_token_norm="constant_norm_rescale"),
    "centered": dict(architecture="relu", center_input=True),
}


def bank_delta(x, idx, coef, bank, terms=ALL_TERMS):
    """The op's math with the whole bank as the working set and every entry applying."""
    applies = torch.ones(idx.shape, dtype=torch.bool)
    return ws_delta(x, idx, coef, applies, bank, terms)


def ws_delta(x, cols, coef, applies, bank, terms=ALL_TERMS):
    """What the op adds: its weights through its own residual update, applied to a zero residual."""
    weights, _ = working_set_weights(
        x, cols, coef, applies, bank.enc.float(), bank.num_rows, bank.params, terms
    )
    return add_delta(torch.zeros(cols.shape[0], bank.dec.shape[1], dtype=bank.dec.dtype), weights, bank.dec)


def op(kind, source, index, a, b, bn=0.0):
    return ResolvedOp(kind, source, index, 3, a, b, bn, POSITION_CODES["all"], 0)


@pytest.mark.parametrize("case", list(SAE_CASES))
def test_delta_matches_reference(case):
    sae = random_sae(**SAE_CASES[case])
    vec = torch.randn(D_IN, generator=torch.Generator().manual_seed(9))
    assets = LoadedAssets(
        {"s": LoadedSAE("s", sae, 3, {}, None)}, {"v": LoadedVector("v", vec, 3)}, SteerConfig()
    )
    bank = build_layer_bank(3, [("s", sae)], [("v", vec)], torch.device("cpu"), torch.float32)
    ops = [
        op("feature", "s", 3, 0.0, 2.5),  # add
        op("feature", "s", 7, -1.0, 4.0),  # clamp
        op("feature", "s", 11, 1.5, 0.0),  # scale x2.5
        op("feature", "s", 20, -1.0, 0.0),  # ablate
        op("feature", "s", 5, 0.0, 0.0, 0.3),  # normalised add
        op("vector", "v", 0, 0.0, -1.2),  # vector
    ]
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(1)) * 3
    idx = torch.tensor([[bank.row(o.kind, o.source, o.index) for o in ops]] * len(x))
    coef = torch.tensor([[[o.a, o.b, o.bn] for o in ops]] * len(x), dtype=torch.float32)
    got = bank_delta(x, idx, coef, bank)
    want = torch.stack([token_delta(row, ops, assets, 0, 1) for row in x])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if sae.per_token_norm == "none" and not sae.center_input:  # what the eager op runs for such an SAE
        lean = bank_delta(x, idx, coef, bank, DeltaTerms(read=True, norm=False, bn=True))
        torch.testing.assert_close(lean, want, rtol=1e-4, atol=1e-5)


def test_clamp_sets_the_feature_and_keeps_the_reconstruction_error():
    """x' = x + (v - f_i)·W_dec[i]: decode(f with f_i = v) + (x - decode(f)) is the steered residual."""
    sae = random_sae("relu", seed=3)
    bank = build_layer_bank(3, [("s", sae)], [], torch.device("cpu"), torch.float32)
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(2))
    f = torch.relu(x @ sae.W_enc + sae.b_enc)  # [4, d_sae], written out
    i, v = 9, 6.0
    idx = torch.full((4, 1), i)
    coef = torch.tensor([[[-1.0, v, 0.0]]] * 4)
    steered = x + bank_delta(x, idx, coef, bank)
    f_clamped = f.clone()
    f_clamped[:, i] = v
    error = x - (f @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(steered, f_clamped @ sae.W_dec + sae.b_dec + error, rtol=1e-5, atol=1e-5)


def test_unused_slots_add_nothing():
    sae = random_sae("relu")
    bank = build_layer_bank(3, [("s", sae)], [], torch.device("cpu"), torch.float32)
    x = torch.randn(3, D_IN)
    delta = bank_delta(x, torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, 3), bank)
    assert torch.equal(delta, torch.zeros_like(delta))


@pytest.mark.parametrize("case", ["relu", "layer_norm", "constant_norm"])
def test_pure_adds_skip_the_feature_read(case):
    """Adds, normalised adds and vectors never read a feature: the read-free path gives the same delta,
    written out here as c_k · W_dec[i_k] (times the SAE's per-token decode scale)."""
    sae = random_sae(**SAE_CASES[case])
    bank = build_layer_bank(3, [("s", sae)], [], torch.device("cpu"), torch.float32)
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(4)) * 2
    idx = torch.tensor([[2, 9]] * 5)
    coef = torch.tensor([[[0.0, 1.5, 0.0], [0.0, -0.5, 0.0]]] * 5)
    with_read = bank_delta(x, idx, coef, bank)
    no_read = DeltaTerms(read=False, norm=case != "relu", bn=False)
    torch.testing.assert_close(bank_delta(None if case == "relu" else x, idx, coef, bank, no_read), with_read)
    if case == "relu":
        torch.testing.assert_close(with_read, (1.5 * sae.W_dec[2] - 0.5 * sae.W_dec[9]).expand(5, -1))


def test_entries_that_do_not_apply_add_nothing_and_repeated_columns_sum():
    sae = random_sae("relu", seed=5)
    bank = build_layer_bank(3, [("s", sae)], [], torch.device("cpu"), torch.float32)
    x = torch.randn(2, D_IN)
    idx = torch.tensor([[4, 4], [4, 7]])
    coef = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 5.0, 0.0], [0.0, 1.0, 0.0]]])
    applies = torch.tensor([[True, True], [False, True]])
    got = ws_delta(x, idx, coef, applies, bank)
    torch.testing.assert_close(got[0], 3.0 * sae.W_dec[4])
    torch.testing.assert_close(got[1], sae.W_dec[7])

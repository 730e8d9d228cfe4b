"""The op's batched math (delta.py) against the definitions, written out per token and per operation.

Requests are stated by meaning (op, value, normalize, positions, when) and resolved as the server does
(`resolve_spec`) into the entries delta.py reads; the expected residual comes from the same meanings alone
(tests/engine/definitions.py: the SAE's own encode and decode in float64, never the engine's coefficients)."""

import pytest
import torch

from steer_plugin.catalog import LoadedAssets, LoadedSAE, LoadedVector
from steer_plugin.config import SteerConfig
from steer_plugin.engine.bank import build_layer_bank
from steer_plugin.engine.delta import (
    ALL_TERMS,
    Conditions,
    DeltaTerms,
    add_delta,
    position_gate,
    working_set_weights,
)
from steer_plugin.request.resolve import resolve_spec
from steer_plugin.request.schema import parse_spec
from steer_plugin.sae.model import SparseAutoencoder

from .definitions import feature, written_out

D_IN, D_SAE = 16, 40
LAYER = 3


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


def ws_delta(x, cols, coef, applies, bank, terms=ALL_TERMS, conditions=None):
    """What the op adds: its weights through its own residual update, applied to a zero residual."""
    weights, _ = working_set_weights(
        x, cols, coef, applies, bank.enc.float(), bank.num_rows, bank.params, terms, conditions
    )
    return add_delta(torch.zeros(cols.shape[0], bank.dec.shape[1], dtype=bank.dec.dtype), weights, bank.dec)


# --- the engine's side: the request resolved into entries, through delta.py ----------------------------------


def engine_change(request: dict, sae, vec, x, pos, prompt_len, terms=ALL_TERMS) -> torch.Tensor:
    """delta.py's change for `request` on every token [n, d], every token carrying all of its entries."""
    assets = LoadedAssets(
        {"s": LoadedSAE("s", sae, LAYER, {}, None)}, {"v": LoadedVector("v", vec, LAYER)}, SteerConfig()
    )
    ops = resolve_spec(parse_spec(request), assets.catalog())
    bank = build_layer_bank(LAYER, [("s", sae)], [("v", vec)], torch.device("cpu"), torch.float32)
    n = len(x)

    def per_token(values, dtype):
        return torch.tensor([values] * n, dtype=dtype)  # [n, K]

    cols = per_token([bank.row(o.kind, o.source, o.index) for o in ops], torch.long)
    coef_k = [[o.coef.a, o.coef.b, o.coef.bn] for o in ops]  # [K, 3]
    coef = torch.tensor([coef_k] * n, dtype=torch.float32)  # [n, K, 3]
    applies = position_gate(
        per_token([o.positions.code for o in ops], torch.long),
        per_token([o.positions.last_n for o in ops], torch.long),
        pos, prompt_len,
    )  # fmt: skip
    whens = [o.when for o in ops]
    conditions = Conditions(
        per_token([0 if w is None else bank.row("feature", w.sae, w.index) for w in whens], torch.long),
        per_token([0.0 if w is None else w.threshold for w in whens], torch.float32),
        per_token([0 if w is None else w.sign for w in whens], torch.long),
    )
    return ws_delta(x, cols, coef, applies, bank, terms, conditions)


# Tokens of two requests in one block: positions 0-5 of a 4-token prompt (4 and 5 generated), then positions 9
# and 10 of a 10-token prompt (the last prompt token and the first generated one).
POS = torch.tensor([0, 1, 2, 3, 4, 5, 9, 10])
PROMPT_LEN = torch.tensor([4, 4, 4, 4, 4, 4, 10, 10])


def between(values: list[float]) -> float:
    """A threshold halfway between the two middle values: some tokens above it, some below, none near it."""
    v = sorted(values)
    return (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def mixed_request(sae: SparseAutoencoder, x: torch.Tensor) -> dict:
    """Every op kind, every positions rule and both `when` directions, on the features most often active on
    these tokens (so clamp, scale and ablate read non-zero activations and the conditions split the tokens)."""
    f = torch.stack([torch.tensor([feature(sae, row, i) for i in range(D_SAE)]) for row in x])  # [n, d_sae]
    order = sorted(range(D_SAE), key=lambda i: (-int((f[:, i] > 0).sum()), -float(f[:, i].sum())))
    a, b, c = order[:3]
    assert all((f[:, i] > 0).any() for i in (a, b, c)), "no active features: the reads would test nothing"
    above, below = between(f[:, a].tolist()), between(f[:, b].tolist())
    assert 0 < sum(f[:, a] > above) < len(x) and 0 < sum(f[:, b] < below) < len(x)
    return {
        "features": [
            {"sae": "s", "index": a, "op": "clamp", "value": 4.0},
            {"sae": "s", "index": b, "op": "scale", "value": 2.5, "positions": {"last_prompt_tokens": 2}},
            {"sae": "s", "index": c, "op": "ablate", "positions": "prompt",
             "when": {"sae": "s", "index": a, "above": above}},
            {"sae": "s", "index": 3, "op": "add", "value": 2.5, "positions": "generation"},
            {"sae": "s", "index": 5, "op": "add", "value": 0.3, "normalize": True},
        ],
        "vectors": [{"name": "v", "scale": -1.2, "when": {"sae": "s", "index": b, "below": below}}],
    }  # fmt: skip


@pytest.mark.parametrize("case", list(SAE_CASES))
def test_delta_matches_the_written_out_definitions(case):
    sae = random_sae(**SAE_CASES[case])
    vec = torch.randn(D_IN, generator=torch.Generator().manual_seed(9))
    x = torch.randn(len(POS), D_IN, generator=torch.Generator().manual_seed(1)) * 3
    request = mixed_request(sae, x)
    want = written_out(request, {"s": sae}, {"v": vec}, x, POS, PROMPT_LEN).float()
    torch.testing.assert_close(
        engine_change(request, sae, vec, x, POS, PROMPT_LEN), want, rtol=1e-4, atol=1e-4
    )
    if sae.per_token_norm == "none" and not sae.center_input:  # what the eager op runs for such an SAE
        lean = DeltaTerms(read=True, norm=False, bn=True, cond=True)
        got = engine_change(request, sae, vec, x, POS, PROMPT_LEN, lean)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["add", "clamp", "scale", "ablate", "add_normalized", "vector"])
def test_each_op_alone_matches_its_definition(op):
    """One op at a time, on every token (a mistake in one op cannot hide behind another's larger change)."""
    sae = random_sae(**SAE_CASES["layer_norm"])
    vec = torch.randn(D_IN, generator=torch.Generator().manual_seed(9))
    x = torch.randn(len(POS), D_IN, generator=torch.Generator().manual_seed(2)) * 3
    active = int(
        torch.stack([torch.tensor([feature(sae, r, i) for i in range(D_SAE)]) for r in x]).sum(0).argmax()
    )
    request = {
        "add": {"features": [{"sae": "s", "index": active, "op": "add", "value": 1.5}]},
        "clamp": {"features": [{"sae": "s", "index": active, "op": "clamp", "value": -2.0}]},
        "scale": {"features": [{"sae": "s", "index": active, "op": "scale", "value": 3.0}]},
        "ablate": {"features": [{"sae": "s", "index": active, "op": "ablate"}]},
        "add_normalized": {"features": [{"sae": "s", "index": active, "op": "add", "value": 0.4, "normalize": True}]},
        "vector": {"vectors": [{"name": "v", "scale": 0.2, "normalize": True}]},
    }[op]  # fmt: skip
    want = written_out(request, {"s": sae}, {"v": vec}, x, POS, PROMPT_LEN).float()
    assert want.abs().amax() > 0.1, "the op changes nothing here: the comparison would have no power"
    torch.testing.assert_close(
        engine_change(request, sae, vec, x, POS, PROMPT_LEN), want, rtol=1e-4, atol=1e-4
    )


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

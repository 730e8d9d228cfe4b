"""A real vLLM engine (eager and default compile mode, fp32) against the HF transformers reference adapter.

Same prompt, same steering -> the same first-token log-probabilities within LOGPROB_TOL; and the steering
moves them by far more than that, so agreement is not an accident.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import PROMPTS, VECTOR_LAYER, sampling, token_prompt

pytestmark = pytest.mark.engine

# Add the demo SAE's concept feature strongly, on generated tokens only. The feature is the analysis'
# recorded choice (quality.json -> concepts.bridge.best), never a literal label or index: a rebuilt SAE
# numbers and labels its latents differently. Read after the session fixtures have built the assets.
GENERATION_VALUE = 80.0


def generation_steering() -> dict:
    from steer_demo.concept import concept_feature

    index = concept_feature().index
    return {
        "features": [
            {"sae": "demo", "index": index, "op": "add", "value": GENERATION_VALUE, "positions": "generation"}
        ]
    }


LOGPROB_TOL = 2e-3  # fp32 vLLM CPU kernels vs HF eager fp32, 30 layers
TOP = 20


@pytest.fixture(scope="module")
def active(hf, assets, sae_layer, prompt_ids) -> list[tuple[int, float]]:
    """The demo SAE's most active features on the prompt's last token: [(index, activation)]."""
    x = hf.residual_after(sae_layer, prompt_ids)[-1]  # [d_model]
    f = assets.saes["demo"].sae.encode(x[None])[0]
    values, indices = torch.topk(f, 4)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def cases(active) -> dict[str, dict]:
    (i0, f0), (i1, f1), (i2, _), (i3, _) = active
    return {
        "add": {"features": [{"sae": "demo", "index": 123, "op": "add", "value": 8.0}]},
        "add_normalized": {
            "features": [{"sae": "demo", "index": 77, "op": "add", "value": 0.6, "normalize": True}]
        },
        "clamp": {"features": [{"sae": "demo", "index": i0, "op": "clamp", "value": 4 * f0 + 4}]},
        "scale": {"features": [{"sae": "demo", "index": i1, "op": "scale", "value": 5.0}]},
        "ablate": {
            "features": [
                {"sae": "demo", "index": i0, "op": "ablate"},
                {"sae": "demo", "index": i2, "op": "ablate"},
            ]
        },
        "vector": {"vectors": [{"name": "unit", "scale": 30.0}]},
        # An inline vector (another direction than the configured one, at the same layer).
        "inline_vector": {"vectors": [{"values": inline_direction(), "layer": VECTOR_LAYER, "scale": 30.0}]},
        # `when`, per token: on the last prompt token i1 is active (above f1 / 2), so the first clamp applies
        # there and the second does not; on other tokens either may hold.
        "conditional": {
            "features": [
                {
                    "sae": "demo",
                    "index": i0,
                    "op": "clamp",
                    "value": 4 * f0 + 4,
                    "when": {"sae": "demo", "index": i1, "above": f1 / 2},
                },
                {
                    "sae": "demo",
                    "index": i2,
                    "op": "clamp",
                    "value": 30.0,
                    "when": {"sae": "demo", "index": i1, "below": f1 / 2},
                },
            ]
        },
        "last_prompt_tokens": {
            "features": [
                {
                    "sae": "demo",
                    "index": 123,
                    "op": "add",
                    "value": 12.0,
                    "positions": {"last_prompt_tokens": 3},
                }
            ]
        },
        "prompt_only_mixed": {
            "features": [
                {"sae": "demo", "index": i3, "op": "clamp", "value": 20.0, "positions": "prompt"},
                {"sae": "demo", "index": 5, "op": "add", "value": 6.0},
            ],
            "vectors": [{"name": "unit", "scale": 0.3, "normalize": True}],
        },
    }


def inline_direction() -> list[float]:
    vec = torch.randn(576, generator=torch.Generator().manual_seed(1))
    return (vec / vec.norm()).tolist()


def vllm_logprobs(llm, assets, ids, steering) -> dict[int, float]:
    out = llm.generate(
        [token_prompt(ids)], sampling(assets, steering, max_tokens=1, logprobs=TOP), use_tqdm=False
    )
    return {tok: lp.logprob for tok, lp in out[0].outputs[0].logprobs[0].items()}


def check_against_reference(llm, hf, assets, prompt_ids, steering) -> float:
    got = vllm_logprobs(llm, assets, prompt_ids, steering)
    want = hf.next_token_logprobs(prompt_ids, steering)
    plain = hf.next_token_logprobs(prompt_ids, None)
    tokens = torch.tensor(list(got))
    err = (torch.tensor(list(got.values())) - want[tokens]).abs().max().item()
    moved = (want[tokens] - plain[tokens]).abs().max().item()
    assert err < LOGPROB_TOL, f"vLLM vs HF reference: max |Δ logprob| {err:.2e}"
    assert moved > 20 * LOGPROB_TOL, (
        f"steering barely moved the logprobs ({moved:.2e}); the check has no power"
    )
    return err


@pytest.mark.parametrize(
    "case",
    [
        "add",
        "add_normalized",
        "clamp",
        "scale",
        "ablate",
        "vector",
        "inline_vector",
        "conditional",
        "last_prompt_tokens",
        "prompt_only_mixed",
    ],
)
def test_first_token_logprobs_match_reference_eager(eager_llm, hf, assets, prompt_ids, active, case):
    check_against_reference(eager_llm, hf, assets, prompt_ids, cases(active)[case])


def test_unsteered_matches_reference(eager_llm, hf, assets, prompt_ids):
    got = vllm_logprobs(eager_llm, assets, prompt_ids, None)
    want = hf.next_token_logprobs(prompt_ids, None)
    err = (torch.tensor(list(got.values())) - want[torch.tensor(list(got))]).abs().max().item()
    assert err < LOGPROB_TOL


def test_generation_only_steering_matches_reference_greedy(eager_llm, hf, assets, prompt_ids):
    """Steering on generated tokens only: the first token is the plain one, the rest follow the reference."""
    steering = generation_steering()
    n = 6
    out = eager_llm.generate(
        [token_prompt(prompt_ids)], sampling(assets, steering, max_tokens=n), use_tqdm=False
    )
    got = list(out[0].outputs[0].token_ids)
    want = hf.greedy(prompt_ids, steering, n)
    plain = hf.greedy(prompt_ids, None, n)
    assert got == want
    assert got[0] == plain[0] and got != plain


def _capture_residuals(worker, layer: int):
    """Worker-side (eager only): hooks around the steering hook that keep the layer's residual before/after."""
    import steer_plugin.engine.op as op_module

    layers = worker.model_runner.get_model().model.layers
    store = op_module.__dict__.setdefault("_test_capture", {})

    def before(module, args, output):
        store["before"] = (output[0] + output[1]).detach().float().cpu()

    def after(module, args, output):
        store["after"] = (output[0] + output[1]).detach().float().cpu()

    store["handles"] = [
        layers[layer].register_forward_hook(before, prepend=True),
        layers[layer].register_forward_hook(after),
    ]
    return True


def _fetch_residuals(worker):
    import steer_plugin.engine.op as op_module

    store = op_module.__dict__["_test_capture"]
    for handle in store.pop("handles"):
        handle.remove()
    return store["before"].tolist(), store["after"].tolist()


def test_clamp_sets_feature_and_keeps_reconstruction_error(eager_llm, assets, sae_layer, prompt_ids, active):
    """In vLLM's own residual stream: x' = decode(f with f_i = v) + (x - decode(f(x))), fp32, tight."""
    index, value = active[1][0], 25.0
    steering = {"features": [{"sae": "demo", "index": index, "op": "clamp", "value": value}]}
    eager_llm.collective_rpc(_capture_residuals, args=(sae_layer,))
    eager_llm.generate([token_prompt(prompt_ids)], sampling(assets, steering, max_tokens=1), use_tqdm=False)
    ((x, x_steered),) = eager_llm.collective_rpc(_fetch_residuals)
    x, x_steered = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(x_steered, dtype=torch.float32)
    # Written out for the demo SAE (SAELens topk, no input normalisation).
    sae = assets.saes["demo"].sae
    x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
    pre = x_in @ sae.W_enc + sae.b_enc  # [T, d_sae]
    top = pre.topk(sae.k)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())  # [T, d_sae]
    f_set = f.clone()
    f_set[:, index] = value
    error = x - (f @ sae.W_dec + sae.b_dec)
    encode_set_decode = f_set @ sae.W_dec + sae.b_dec + error  # [T, d_model]
    # Where the feature is in the token's top k (or inactive), that is exactly what the engine wrote.
    agrees = f[:, index] == pre[:, index].relu()
    assert agrees[-1], "the chosen feature should be active on the last prompt token"
    # fp32 rounding scales with |x|: position 0 (the attention sink) has |x| ~ 2e4, the others ~ 2e2.
    atol = 1e-6 * x.abs().amax(dim=-1, keepdim=True).clamp_min(100.0)  # [T, 1]
    close = (x_steered - encode_set_decode).abs() <= atol + 1e-5 * encode_set_decode.abs()
    assert close[agrees].all()
    # Everywhere: the documented topk clamp, x' = x + (v - relu(pre_i))·W_dec[i].
    expected_delta = (value - pre[:, index].relu())[:, None] * sae.W_dec[index]
    assert ((x_steered - x - expected_delta).abs() <= atol).all()


@pytest.mark.parametrize("case", ["clamp", "vector", "inline_vector", "conditional", "prompt_only_mixed"])
def test_first_token_logprobs_match_reference_compiled(compiled_llm, hf, assets, prompt_ids, active, case):
    check_against_reference(compiled_llm, hf, assets, prompt_ids, cases(active)[case])


def test_compiled_decode_steps_match_eager(compiled_llm, eager_llm, assets):
    """Steering that fires on every decode step gives the same greedy text under compile as in eager mode."""
    steering = generation_steering()
    params = sampling(assets, steering, max_tokens=12)
    prompts = [p for p in PROMPTS[:3]]
    eager = [o.outputs[0].text for o in eager_llm.generate(prompts, params, use_tqdm=False)]
    compiled = [o.outputs[0].text for o in compiled_llm.generate(prompts, params, use_tqdm=False)]
    plain = [
        o.outputs[0].text
        for o in compiled_llm.generate(prompts, sampling(assets, None, max_tokens=12), use_tqdm=False)
    ]
    assert compiled == eager
    assert compiled != plain

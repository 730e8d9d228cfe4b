"""Every accepted architecture, for real: a tiny random model of each (tests/integration/tiny_models.py) served by
the real vLLM CPU build, against the HF transformers reference adapter, fp32.

Per architecture:
- the residual stream vLLM's decoder layer hands on (hidden_states + residual), read in a plugin-disabled engine
  (tests/integration/plain_engines.py, a process where the plugin never loads, so independently of our op), is HF
  `hidden_states[L + 1]`: the stream SAELens' `blocks.L.hook_resid_post` means;
- unsteered requests through the plugin give exactly the plugin-disabled engine's log-probs and greedy tokens;
- add, clamp and a vector at layer 2 give the HF reference adapter's first-token log-probs (eager; one
  architecture also under vLLM's default compile mode), and generation-only steering its log-probs on every
  decode step.

The plugin's engines run in this process (engine core and worker too: `VLLM_ENABLE_V1_MULTIPROCESSING=0`, the
"uni" executor), one at a time: starting one takes seconds instead of a minute on the 2-core machine. The model
code, the plugin's hooks, op and batch glue are the same as in a server; the multi-process engine is covered by
the demo-model tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import inprocess_engine, sampling, token_prompt
from .plain_engines import TOP
from .tiny_models import ARCHITECTURES, SAE_LAYER, TinyModel, build_all

pytestmark = pytest.mark.engine

# fp32 on both sides. Measured: |Δ logprob| up to 1.6e-5 between vLLM and HF on these models (kernels reduce in
# other orders). The bound leaves ~60x room for other CPUs and kernels, and is still 1/20 of the least any steering
# case here moves the log-probs (0.27; checked per case), while a steering op on the wrong layer is off by 0.4-2.4.
LOGPROB_TOL = 1e-3
STREAM_RTOL = 1e-4  # residual stream vs HF, relative to its largest entry (fp32: ~1e-6 measured)
PROMPT_TEXT = "The Golden Gate Bridge spans the strait between San Francisco and Marin County."
# Also under vLLM's default compile mode: post-attention / post-feedforward norms and soft-capping, under inductor.
COMPILED_ARCH = "Gemma2ForCausalLM"


@pytest.fixture(scope="module")
def tiny_models(demo_assets, tmp_path_factory) -> dict[str, TinyModel]:
    return build_all(tmp_path_factory.mktemp("tiny-models"), demo_assets.model_dir)


@pytest.fixture(scope="module")
def tiny_assets(tiny_models):
    from steer_plugin.catalog import load_assets
    from steer_plugin.config import load_config_file

    return load_assets(load_config_file(str(next(iter(tiny_models.values())).config_path)))


@pytest.fixture(scope="module")
def prompt_ids(demo_assets) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets.model_dir))
    return [1, *tokenizer(PROMPT_TEXT)["input_ids"]]


@pytest.fixture(scope="module")
def plain_runs(tiny_models, prompt_ids, tmp_path_factory) -> dict[str, dict]:
    """Every tiny model through plugin-disabled vLLM, in a fresh process (see plain_engines.py)."""
    out = tmp_path_factory.mktemp("plain") / "plain.pt"
    dirs = [str(tiny_models[a].model_dir) for a in ARCHITECTURES]
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.plain_engines", str(out), json.dumps(prompt_ids),
         str(SAE_LAYER), *dirs],
        env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"plugin-disabled runs of {len(dirs)} models: {time.time() - started:.1f} s")
    results = torch.load(out)
    return {a: results[str(tiny_models[a].model_dir)] for a in ARCHITECTURES}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hf_ref(arch, tiny_models, tiny_assets):
    from steer_adapters.hf.reference import HFReference

    return HFReference(str(tiny_models[arch].model_dir), tiny_assets, dtype=torch.float32)


@pytest.fixture(scope="module")
def plugin_llm(arch, tiny_models):
    model = tiny_models[arch]
    started = time.time()
    with inprocess_engine(str(model.model_dir), str(model.config_path)) as llm:
        print(f"{arch}: plugin engine ready in {time.time() - started:.1f} s")
        yield llm


# --- checks ---------------------------------------------------------------------------------------------------


def first_token_logprobs(llm, assets, ids: list[int], steering: dict | None) -> dict[int, float]:
    out = llm.generate(
        [token_prompt(ids)], sampling(assets, steering, max_tokens=1, logprobs=TOP), use_tqdm=False
    )
    return {tok: lp.logprob for tok, lp in out[0].outputs[0].logprobs[0].items()}


def steering_cases(hf_ref, assets, ids: list[int]) -> dict[str, dict]:
    """add, clamp (the most active feature on the last prompt token, to 4x + 4) and the configured vector."""
    x = hf_ref.residual_after(SAE_LAYER, ids)[-1]  # [d]
    f = assets.saes["tiny"].sae.encode(x[None])[0]  # [d_sae]
    top = int(f.argmax())
    assert f[top] > 0, "no active feature on the last prompt token: the clamp case would test nothing"
    return {
        "add": {"features": [{"sae": "tiny", "index": 5, "op": "add", "value": 8.0}]},
        "clamp": {"features": [{"sae": "tiny", "index": top, "op": "clamp", "value": 4 * float(f[top]) + 4}]},
        "vector": {"vectors": [{"name": "unit", "scale": 12.0}]},
    }


def reference_error(llm, hf_ref, assets, ids: list[int], steering: dict) -> tuple[float, float]:
    """(max |Δ logprob| vLLM vs reference over vLLM's top tokens, how far steering moved them)."""
    got = first_token_logprobs(llm, assets, ids, steering)
    want = hf_ref.next_token_logprobs(ids, steering)  # [vocab]
    plain = hf_ref.next_token_logprobs(ids, None)  # [vocab]
    tokens = torch.tensor(list(got))
    err = (torch.tensor(list(got.values())) - want[tokens]).abs().max().item()
    moved = (want[tokens] - plain[tokens]).abs().max().item()
    return err, moved


def test_residual_stream_is_hook_resid_post(arch, plain_runs, hf_ref, prompt_ids):
    """vLLM's hidden_states + residual after layer L (plugin disabled) = HF hidden_states[L + 1] at every prompt
    position; the residual alone is not (so the check tells the conventions apart)."""
    run = plain_runs[arch]
    want = hf_ref.residual_after(SAE_LAYER, prompt_ids)  # [T, d]
    scale = want.abs().amax()
    err = ((run["stream"] - want).abs().max() / scale).item()
    wrong = ((run["residual_only"] - want).abs().max() / scale).item()
    print(f"{arch}: stream after layer {SAE_LAYER} vs HF hidden_states[{SAE_LAYER + 1}]: rel err {err:.1e}")
    assert err < STREAM_RTOL, f"{arch}: vLLM's residual after layer {SAE_LAYER} differs from HF's ({err:.1e})"
    assert wrong > 100 * STREAM_RTOL, f"{arch}: the residual alone matches too; the check cannot tell"


def test_unsteered_equals_plugin_disabled(arch, plugin_llm, plain_runs, hf_ref, tiny_assets, prompt_ids):
    """Through the plugin without steering: the plugin-disabled engine's log-probs and greedy tokens, exactly;
    and both match the HF model."""
    run = plain_runs[arch]
    got = first_token_logprobs(plugin_llm, tiny_assets, prompt_ids, None)
    assert got == run["logprobs"]
    params = sampling(tiny_assets, None, max_tokens=len(run["tokens"]))
    tokens = plugin_llm.generate([token_prompt(prompt_ids)], params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(tokens) == run["tokens"]
    want = hf_ref.next_token_logprobs(prompt_ids, None)  # [vocab]
    err = max(abs(lp - float(want[t])) for t, lp in got.items())
    print(f"{arch}: unsteered vs HF max |Δ logprob| {err:.1e}")
    assert err < LOGPROB_TOL


@pytest.mark.parametrize("case", ["add", "clamp", "vector"])
def test_steered_first_token_matches_reference(arch, plugin_llm, hf_ref, tiny_assets, prompt_ids, case):
    steering = steering_cases(hf_ref, tiny_assets, prompt_ids)[case]
    err, moved = reference_error(plugin_llm, hf_ref, tiny_assets, prompt_ids, steering)
    print(f"{arch} {case}: max |Δ logprob| vs HF reference {err:.1e} (steering moved them {moved:.2f})")
    assert err < LOGPROB_TOL, f"{arch} {case}: vLLM vs HF reference max |Δ logprob| {err:.2e}"
    assert moved > 20 * LOGPROB_TOL, f"{arch} {case}: steering barely moved the logprobs ({moved:.2e})"


GENERATED = 4


def test_generation_steering_matches_reference_on_decode_steps(
    arch, plugin_llm, hf_ref, tiny_assets, prompt_ids
):
    """Steering on generated positions only: every decode step's log-probs (KV cache, one token per forward)
    follow the reference; the first token, predicted from the last prompt position, is the unsteered one."""
    steering = {
        "features": [{"sae": "tiny", "index": 5, "op": "add", "value": 8.0, "positions": "generation"}]
    }
    out = plugin_llm.generate(
        [token_prompt(prompt_ids)],
        sampling(tiny_assets, steering, max_tokens=GENERATED, logprobs=TOP),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) == GENERATED
    errors, moved = [], []
    for k, step in enumerate(out.logprobs):
        ids = prompt_ids + list(out.token_ids[:k])
        want = hf_ref.next_token_logprobs(ids, steering, len(prompt_ids))  # [vocab]
        plain = hf_ref.next_token_logprobs(ids, None, len(prompt_ids))  # [vocab]
        errors.append(max(abs(lp.logprob - float(want[t])) for t, lp in step.items()))
        moved.append(max(abs(float(want[t] - plain[t])) for t in step))
    print(f"{arch} generation: max |Δ logprob| per step {[f'{e:.1e}' for e in errors]}")
    assert max(errors) < LOGPROB_TOL
    assert moved[0] == 0.0 and min(moved[1:]) > 20 * LOGPROB_TOL, moved


def test_compiled_steering_matches_reference(tiny_models, tiny_assets, prompt_ids):
    """One architecture under vLLM's default compile mode (dynamo + inductor): the op in the compiled graph."""
    from steer_adapters.hf.reference import HFReference

    model = tiny_models[COMPILED_ARCH]
    hf_ref = HFReference(str(model.model_dir), tiny_assets, dtype=torch.float32)
    cases = steering_cases(hf_ref, tiny_assets, prompt_ids)
    started = time.time()
    with inprocess_engine(str(model.model_dir), str(model.config_path), enforce_eager=False) as llm:
        print(f"{COMPILED_ARCH}: compiled plugin engine ready in {time.time() - started:.1f} s")
        for case in ("add", "clamp", "vector"):
            err, moved = reference_error(llm, hf_ref, tiny_assets, prompt_ids, cases[case])
            print(f"{COMPILED_ARCH} compiled {case}: max |Δ logprob| {err:.1e} (moved {moved:.2f})")
            assert err < LOGPROB_TOL, f"compiled {case}: max |Δ logprob| {err:.2e}"
            assert moved > 20 * LOGPROB_TOL

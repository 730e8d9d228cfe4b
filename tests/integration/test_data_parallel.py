"""Data parallel 2 on the vLLM CPU build, as it is scaled out: `steer-serve ... --data-parallel-size 2
--api-server-count 2`, two engine cores (one worker each) behind two API server processes (one port; the kernel
hands each new connection to either), with the demo model and SAE. Every check sends its requests concurrently,
so that vLLM's load balancer gives both engine cores work, and asserts from vLLM's per-engine `/metrics` series
(`engine="0"`, `engine="1"`) that both did: steering equals the HF reference (the engine-fidelity cases), `inspect`
reads the reference's features, `abort_when` stops every request at the crossing token, a runtime load reaches
both ranks and both API processes, and the plugin's worker figures on /metrics count the workers of both
ranks."""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from .conftest import PROMPTS, chat_ids, running_server, write_runtime_config
from .test_engine_fidelity import LOGPROB_TOL, TOP, cases, generation_steering

pytestmark = pytest.mark.server

PORT = 18851 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
DP = 2
API_PROCESSES = 2
KEY = "dp-test-admin-key-0123456789abcdef"
ADMIN = {"X-Steer-Admin-Key": KEY}
RUNTIME_LAYER = 5


@pytest.fixture(scope="module")
def root(demo_assets, tmp_path_factory):
    """The admin API's allowed root: a copy of the demo SAE, loaded at runtime as `demo2`."""
    folder = tmp_path_factory.mktemp("dp-root")
    shutil.copytree(demo_assets.sae_dir, folder / "demo-copy")
    return folder


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, assets, sae_layer, root, tmp_path_factory):
    rows = assets.saes["demo"].sae.d_sae + 4
    folder = tmp_path_factory.mktemp("dp-config")
    path = write_runtime_config(steer_config_path, folder, [sae_layer, RUNTIME_LAYER], rows, root)
    # steer-serve runs `vllm serve` for several API processes (api/serve.py), which makes its own metrics dir.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"STEER_ADMIN_KEY": KEY}
    started = time.time()
    flags = ("--data-parallel-size", str(DP), "--api-server-count", str(API_PROCESSES))
    with running_server(demo_assets.model_dir, path, PORT, *flags, env=env) as proc:
        print(
            f"DP={DP} server with {API_PROCESSES} API processes healthy after {time.time() - started:.1f} s"
        )
        yield proc


# --- helpers ----------------------------------------------------------------------------------------------------


def metric_lines(name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `name` on /metrics: (labels, value)."""
    text = requests.get(f"{BASE}/metrics", timeout=30).text
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def metric(name: str, **labels) -> float:
    return sum(v for lab, v in metric_lines(name) if all(lab.get(k) == w for k, w in labels.items()))


def finished_per_engine() -> dict[str, float]:
    """Requests each engine core finished (any reason), from vLLM's own per-engine series."""
    out: dict[str, float] = {}
    for labels, value in metric_lines("vllm:request_success_total"):
        out[labels["engine"]] = out.get(labels["engine"], 0.0) + value
    return out


def on_both_engines(send, bodies: list[dict]) -> list[dict]:
    """`send(body)` for every body at once; asserts that every engine core finished some of them."""
    before = finished_per_engine()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        replies = list(pool.map(send, bodies))
    after = finished_per_engine()
    moved = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert sorted(moved) == [str(i) for i in range(DP)], moved
    assert all(n >= 1 for n in moved.values()), f"an engine core got no request: {moved}"
    print(f"requests finished per engine core: {moved}")
    return replies


def completion(body: dict) -> dict:
    reply = requests.post(
        f"{BASE}/v1/completions", json={"model": "demo", "temperature": 0, **body}, timeout=300
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def chat(body: dict) -> dict:
    reply = requests.post(
        f"{BASE}/v1/chat/completions", json={"model": "demo", "temperature": 0, **body}, timeout=300
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def first_token_body(ids: list[int], steering: dict | None) -> dict:
    return {
        "prompt": ids,
        "max_tokens": 1,
        "logprobs": TOP,
        "return_tokens_as_token_ids": True,
        **({"steering": steering} if steering else {}),
    }


def first_token_logprobs(reply: dict) -> dict[int, float]:
    top = reply["choices"][0]["logprobs"]["top_logprobs"][0]  # {"token_id:123": logprob}
    return {int(token.split(":", 1)[1]): value for token, value in top.items()}


@pytest.fixture(scope="module")
def prompt_ids(hf) -> list[int]:
    return chat_ids(hf.tokenizer, PROMPTS[0])


@pytest.fixture(scope="module")
def active(hf, assets, sae_layer, prompt_ids) -> list[tuple[int, float]]:
    """The demo SAE's most active features on the prompt's last token (as test_engine_fidelity picks them)."""
    x = hf.residual_after(sae_layer, prompt_ids)[-1]  # [d_model]
    values, indices = torch.topk(assets.saes["demo"].sae.encode(x[None])[0], 4)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


# --- the checks -------------------------------------------------------------------------------------------------


def test_steering_equals_the_reference_on_both_engine_cores(server, hf, prompt_ids, active):
    """Every engine-fidelity case at once (first-token log-probs within LOGPROB_TOL of the HF reference, and moved
    by far more), plus generation-only steering's greedy tokens equal to the reference's, on three prompts."""
    started = time.time()
    named = cases(active)
    prompts = [chat_ids(hf.tokenizer, text) for text in PROMPTS[:3]]
    bodies = [first_token_body(prompt_ids, steering) for steering in named.values()]
    bodies += [
        {"prompt": ids, "max_tokens": 6, "return_token_ids": True, "steering": generation_steering()}
        for ids in prompts
    ]
    replies = on_both_engines(completion, bodies)
    plain = hf.next_token_logprobs(prompt_ids, None)
    errors = {}
    for (name, steering), reply in zip(named.items(), replies):
        got = first_token_logprobs(reply)
        want = hf.next_token_logprobs(prompt_ids, steering)
        tokens = torch.tensor(list(got))
        errors[name] = (torch.tensor(list(got.values())) - want[tokens]).abs().max().item()
        moved = (want[tokens] - plain[tokens]).abs().max().item()
        assert errors[name] < LOGPROB_TOL, (
            f"{name}: vLLM DP=2 vs HF reference: max |Δ logprob| {errors[name]:.2e}"
        )
        assert moved > 20 * LOGPROB_TOL, f"{name}: steering barely moved the logprobs ({moved:.2e})"
    print("max |Δ logprob| per case: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    changed = 0
    for ids, reply in zip(prompts, replies[len(named) :]):
        got = reply["choices"][0]["token_ids"]
        want = hf.greedy(ids, generation_steering(), 6)
        assert got == want, (got, want)
        changed += got != hf.greedy(ids, None, 6)
    # Not vacuous: the steering changed some answer (a prompt whose first 6 greedy tokens it leaves alone depends
    # on the SAE a machine's asset build trained, e.g. the bridge question with the bridge feature added).
    assert changed, "generation steering changed none of the answers"
    print(f"steering vs reference: {time.time() - started:.1f} s")


def test_inspect_reads_the_reference_features_on_both_engine_cores(server, hf, assets, sae_layer):
    """Unsteered requests with `inspect`: one record per generated token, whose strongest feature and activation
    are the reference encode of the residual that predicted it."""
    prompts = [chat_ids(hf.tokenizer, text) for text in PROMPTS[:4]]
    n = 5
    bodies = [
        {"prompt": ids, "max_tokens": n, "return_token_ids": True, "steering": {"inspect": {"top_k": 5}}}
        for ids in prompts
    ]
    replies = on_both_engines(completion, bodies)
    sae = assets.saes["demo"].sae
    for ids, reply in zip(prompts, replies):
        choice = reply["choices"][0]
        generated = choice["token_ids"]
        tokens = choice["steering"]["tokens"]
        assert len(tokens) == len(generated) == n, (len(tokens), generated)
        x = hf.residual_after(sae_layer, ids + generated[:-1])[len(ids) - 1 :]  # [n, d]: predicting residuals
        f = sae.encode(x)  # [n, d_sae]
        for k, record in enumerate(tokens):
            got = {d["index"]: d["activation"] for d in record["demo"]}
            values, indices = torch.topk(f[k], 5)
            want = {int(i): float(v) for i, v in zip(indices, values) if v > 0}
            strongest = max(want, key=want.get)
            assert strongest in got, (k, got, want)
            for index in set(got) & set(want):
                assert abs(got[index] - want[index]) <= 1e-2 * max(1.0, want[index]), (k, index, got, want)


def test_abort_when_stops_every_request_at_the_crossing(server, demo_assets):
    """The greedy bridge answer's traced concept feature gives the crossing token; four concurrent requests
    with abort_when on it all end there with finish_reason "abort_when"."""
    from steer_demo.concept import concept_feature

    concept = concept_feature(demo_assets).index
    body = {
        "messages": [{"role": "user", "content": "Tell me about the Golden Gate Bridge."}],
        "max_tokens": 40,
        "logprobs": True,
    }
    full = chat(
        {**body, "steering": {"inspect": {"top_k": 1, "features": [{"sae": "demo", "index": concept}]}}}
    )
    values = [v[0] for v in full["choices"][0]["steering"]["traced"]]
    tokens = [t["token"] for t in full["choices"][0]["logprobs"]["content"]]
    threshold = 2.0
    crossing = next(k for k, v in enumerate(values) if v > threshold)
    assert crossing >= 2, values
    abort = {"abort_when": [{"sae": "demo", "index": concept, "above": threshold}]}
    before = metric("steer_aborted_requests_total", sae="demo")
    replies = on_both_engines(chat, [{**body, "steering": abort}] * 4)
    for reply in replies:
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "abort_when", choice
        kept = [t["token"] for t in choice["logprobs"]["content"]]
        assert kept[:crossing] == tokens[:crossing] and len(kept) <= crossing + 1
        assert choice["steering"]["abort"]["token"] == crossing
    deadline = time.time() + 10
    while time.time() < deadline and metric("steer_aborted_requests_total", sae="demo") < before + 4:
        time.sleep(0.2)
    assert metric("steer_aborted_requests_total", sae="demo") == before + 4


def test_runtime_load_reaches_every_dp_rank(server, root, prompt_ids):
    """An SAE loaded at runtime steers on both engine cores exactly like the configured one it copies."""
    loaded = requests.post(
        f"{BASE}/v1/steering/saes",
        json={"id": "demo2", "path": str(root / "demo-copy")},
        headers=ADMIN,
        timeout=300,
    )
    assert loaded.status_code == 201, loaded.text

    def clamp(sae: str) -> dict:
        return {"features": [{"sae": sae, "index": 100, "op": "clamp", "value": 60.0}]}

    configured = first_token_logprobs(completion(first_token_body(prompt_ids, clamp("demo"))))
    plain = first_token_logprobs(completion(first_token_body(prompt_ids, None)))
    assert configured != plain
    replies = on_both_engines(completion, [first_token_body(prompt_ids, clamp("demo2"))] * 6)
    # Until both API processes have planned with the load (each reads the workers' registry when a request of
    # its own names what it does not know): the kernel spreads new connections over them unevenly.
    for _ in range(40):
        generations = {lab["pid"]: v for lab, v in metric_lines("steer_runtime_catalog_generation")}
        assert len(generations) == API_PROCESSES, generations
        if set(generations.values()) == {1.0}:
            break
        replies.append(completion(first_token_body(prompt_ids, clamp("demo2"))))
    else:
        pytest.fail(f"an API process never planned with the runtime load: {generations}")
    for reply in replies:
        got = first_token_logprobs(reply)
        assert got.keys() == configured.keys()
        assert max(abs(got[t] - configured[t]) for t in got) < 1e-4
        assert reply["choices"][0]["steering"]["applied"][0]["sae"] == "demo2"


def test_worker_figures_on_metrics_count_every_dp_rank(server, hf):
    """The plugin's worker series sum the workers of both engine cores: six concurrent clamp requests add exactly
    their token-operation pairs (every prompt and generated token but the last, which no forward reads) and one
    applied feature each."""
    clamp = {"features": [{"sae": "demo", "index": 100, "op": "clamp", "value": 60.0}]}
    bodies = [
        {"prompt": chat_ids(hf.tokenizer, text), "max_tokens": 4 + i, "steering": clamp}
        for i, text in enumerate(PROMPTS)
    ]
    tokens_before = metric("steer_steered_tokens_total", op="clamp")
    applied_before = metric("steer_features_applied_total", sae="demo")
    replies = on_both_engines(completion, bodies)
    expected = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] - 1 for r in replies)
    assert metric("steer_steered_tokens_total", op="clamp") - tokens_before == expected
    assert metric("steer_features_applied_total", sae="demo") - applied_before == len(bodies)

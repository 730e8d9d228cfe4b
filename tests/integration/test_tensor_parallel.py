"""Tensor parallel 2 on the vLLM CPU build (gloo, one OpenMP core per rank), with the tiny Llama whose 4 query and 2
KV heads split over two ranks: steered outputs equal one rank's, an unsteered request in the same batch equals the
plugin-disabled TP=2 engine's, and observations come once per token (only TP rank 0 writes them)."""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager

import pytest

from steer_plugin.request.records import TokenRecord

from .conftest import engine, inprocess_engine, resolve, token_prompt
from .plain_engines import TOP
from .tiny_models import TinyModel, build_all

pytestmark = pytest.mark.engine

ARCH = "LlamaForCausalLM"
MAX_TOKENS = 8
INSPECT_TOP_K = 4
# Same fp32 bound as the architecture tests: the two ranks' all-reduce sums in another order than one rank.
LOGPROB_TOL = 1e-3
PROMPT_TEXTS = [
    "The Golden Gate Bridge spans the strait between San Francisco and Marin County.",
    "A good tomato soup starts with onions, garlic and ripe tomatoes.",
    "Rockets reach orbit by going sideways very fast.",
    "Thunderstorms form when warm moist air rises.",
]


@pytest.fixture(scope="module")
def tiny(demo_assets, tmp_path_factory) -> TinyModel:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip(
            "TP=2 on the CPU build binds one OpenMP core per rank: this machine has fewer than 2 cores"
        )
    return build_all(tmp_path_factory.mktemp("tiny-tp"), demo_assets.model_dir, (ARCH,))[ARCH]


@pytest.fixture(scope="module")
def tiny_assets(tiny):
    from steer_plugin.catalog import load_assets
    from steer_plugin.config import load_config_file

    return load_assets(load_config_file(str(tiny.config_path)))


@pytest.fixture(scope="module")
def prompts(demo_assets) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets.model_dir))
    return [[1, *tokenizer(text)["input_ids"]] for text in PROMPT_TEXTS]


def steerings() -> list[dict | None]:
    """Per request of the batch: unsteered, add, clamp (generation only) and a vector."""
    return [
        None,
        {"features": [{"sae": "tiny", "index": 5, "op": "add", "value": 8.0}]},
        {"features": [{"sae": "tiny", "index": 9, "op": "clamp", "value": 30.0, "positions": "generation"}]},
        {"vectors": [{"name": "unit", "scale": 12.0}]},
    ]


def batch_params(assets, observe_to: tuple[str, str] | None) -> list:
    """SamplingParams of the batch; with `observe_to` (inbox address, cid), the steered add request also inspects
    (top-K, generated tokens), its records sent to that inbox."""
    from vllm import SamplingParams

    from steer_plugin.request.wire import WIRE_KEY, ObservePlan, RequestPlan

    params = []
    for i, steering in enumerate(steerings()):
        ops = resolve(assets, steering) if steering else []
        observe = None
        if observe_to is not None and i == 1:
            address, cid = observe_to
            observe = ObservePlan(cid, ("tiny",), INSPECT_TOP_K, False, reply_to=address)
        extra = {WIRE_KEY: RequestPlan.build(ops, observe=observe).encode()} if ops or observe else {}
        params.append(
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP, extra_args=extra or None)
        )
    return params


def received(inbox, cid: str, count: int) -> list:
    """The records of `cid` once `count` have come (bounded), then whatever else comes within a second: a
    second writer (a TP rank that should not write) would show as extra records."""
    records = []
    deadline = time.monotonic() + 60
    while len(records) < count and time.monotonic() < deadline:
        records += inbox.take(cid)
        inbox.wait(0.05)
    settle = time.monotonic() + 1.0
    while time.monotonic() < settle:
        inbox.wait(0.05)
        records += inbox.take(cid)
    return records


def run_batch(
    llm, assets, prompts, inspect: bool
) -> tuple[list[list[int]], list[dict[int, float]], list[dict]]:
    """(greedy tokens, first-token log-probs per request, the inspected request's observation records, which the
    workers send to this process's observation inbox)."""
    from steer_plugin.monitor.inbox import inbox as observe_inbox

    inbox = observe_inbox()
    cid = uuid.uuid4().hex
    if inspect:
        inbox.open(cid)
    try:
        outputs = llm.generate(
            [token_prompt(p) for p in prompts],
            batch_params(assets, (inbox.address, cid) if inspect else None),
            use_tqdm=False,
        )
        records = received(inbox, cid, len(outputs[1].outputs[0].token_ids)) if inspect else []
    finally:
        inbox.close(cid)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs]
    return tokens, logprobs, records


@contextmanager
def one_core_per_rank():
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # the CPU build cannot bind two ranks to one NUMA node
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def check_records(records: list[TokenRecord], prompt_len: int, tokens: list[int]) -> dict[int, list[int]]:
    """One record per generated token, at the position that predicted it; {pos: top feature indices}."""
    positions = [r.pos for r in records]
    assert positions == list(range(prompt_len - 1, prompt_len - 1 + len(tokens))), positions
    assert all(r.sae == "tiny" and len(r.top) >= 1 for r in records)
    return {r.pos: [i for i, _ in r.top] for r in records}


def test_tp2_equals_tp1_with_isolation_and_single_observations(tiny, tiny_assets, prompts):
    started = time.time()
    with inprocess_engine(str(tiny.model_dir), str(tiny.config_path)) as llm:
        tp1_tokens, tp1_logprobs, tp1_records = run_batch(llm, tiny_assets, prompts, inspect=True)
    with one_core_per_rank():
        with engine(
            str(tiny.model_dir), str(tiny.config_path), enforce_eager=True, tensor_parallel_size=2
        ) as llm:
            print(f"TP=2 plugin engine ready after {time.time() - started:.1f} s")
            assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
            tp2_tokens, tp2_logprobs, tp2_records = run_batch(llm, tiny_assets, prompts, inspect=True)
        with engine(
            str(tiny.model_dir), None, enforce_eager=True, plugins=False, tensor_parallel_size=2
        ) as llm:
            plain_tokens, plain_logprobs, _ = run_batch(llm, tiny_assets, prompts, inspect=False)
    print(f"TP test engines done after {time.time() - started:.1f} s")

    # Steered (and unsteered) outputs: TP=2 = TP=1.
    assert tp2_tokens == tp1_tokens
    errors = [
        max(abs(lp - one[t]) for t, lp in two.items() if t in one)
        for one, two in zip(tp1_logprobs, tp2_logprobs)
    ]
    print(f"TP=2 vs TP=1 max |Δ logprob| per request: {[f'{e:.1e}' for e in errors]}")
    assert max(errors) < LOGPROB_TOL
    # Steering changed every steered request's tokens (else the equality above proves little).
    assert all(tp2_tokens[i] != plain_tokens[i] for i in (1, 2, 3)), (tp2_tokens, plain_tokens)
    # Isolation: the unsteered request of the mixed TP=2 batch = the plugin-disabled TP=2 engine's, exactly.
    assert tp2_tokens[0] == plain_tokens[0] and tp2_logprobs[0] == plain_logprobs[0]
    # Observations: one set of features per generated token, the same as one rank reads.
    one = check_records(tp1_records, len(prompts[1]), tp1_tokens[1])
    two = check_records(tp2_records, len(prompts[1]), tp2_tokens[1])
    assert two == one

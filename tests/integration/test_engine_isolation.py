"""Per-request isolation, prefix-cache safety and the start-up self-test, on real vLLM engines."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from steer_plugin.messages import WorkerStats

from .conftest import PROMPTS, engine, sampling, token_prompt

pytestmark = pytest.mark.engine

MAX_TOKENS = 16


def worker_stats(llm) -> WorkerStats:
    """The first worker's figures, through the plugin's worker extension (they cross as a wire dict)."""
    return WorkerStats.from_wire(llm.collective_rpc("steer_plugin_stats")[0])


def distinct_steerings() -> list[dict]:
    """Six different configs, strong enough to change greedy text: one per steered request in the batch."""
    return [
        {"features": [{"sae": "demo", "index": 123, "op": "add", "value": 0.8, "normalize": True}]},
        {"features": [{"sae": "demo", "index": 7, "op": "clamp", "value": 60.0, "positions": "generation"}]},
        {"vectors": [{"name": "unit", "scale": 0.8, "normalize": True}]},
        {"features": [{"sae": "demo", "index": 300, "op": "add", "value": 0.7, "normalize": True}]},
        {
            "features": [
                {
                    "sae": "demo",
                    "index": 42,
                    "op": "add",
                    "value": 1.0,
                    "normalize": True,
                    "positions": {"last_prompt_tokens": 4},
                }
            ]
        },
        {
            "features": [
                {"sae": "demo", "index": 900, "op": "add", "value": 0.8, "normalize": True},
                {"sae": "demo", "index": 11, "op": "ablate"},
            ],
            "vectors": [{"name": "unit", "scale": -10.0, "positions": "prompt"}],
        },
    ]


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


@pytest.fixture(scope="module")
def plain_outputs(plain_llm, assets) -> list[str]:
    return texts(plain_llm.generate(PROMPTS, sampling(assets, None, max_tokens=MAX_TOKENS), use_tqdm=False))


def check_isolation(llm, assets, plain_outputs):
    steerings = distinct_steerings()
    prompts = PROMPTS + PROMPTS
    params = [sampling(assets, None, max_tokens=MAX_TOKENS)] * len(PROMPTS) + [
        sampling(assets, s, max_tokens=MAX_TOKENS) for s in steerings
    ]
    mixed = texts(llm.generate(prompts, params, use_tqdm=False))
    unsteered, steered = mixed[: len(PROMPTS)], mixed[len(PROMPTS) :]
    assert unsteered == plain_outputs, "unsteered requests changed by steered neighbours in the batch"
    assert sum(s != p for s, p in zip(steered, plain_outputs)) >= 5, "steering should change most outputs"
    alone = [
        texts(llm.generate([p], [sampling(assets, s, max_tokens=MAX_TOKENS)], use_tqdm=False))[0]
        for p, s in zip(PROMPTS, steerings)
    ]
    assert alone == steered, "a steered request differs alone and in a crowd"


def test_isolation_eager(eager_llm, assets, plain_outputs):
    check_isolation(eager_llm, assets, plain_outputs)


def test_isolation_compiled(compiled_llm, assets, plain_outputs):
    check_isolation(compiled_llm, assets, plain_outputs)


def test_plugin_without_steering_matches_plain(eager_llm, assets, plain_outputs):
    assert (
        texts(eager_llm.generate(PROMPTS, sampling(assets, None, max_tokens=MAX_TOKENS), use_tqdm=False))
        == plain_outputs
    )


def test_the_offline_one_liner_reads_the_steering_config_from_the_llm(eager_llm, assets):
    """README: SamplingParams(extra_args=steering_args(llm, steering)) with the real `LLM` class gives the plan
    built from the loaded assets (every engine test's path), and the worker applies it."""
    from vllm import SamplingParams

    from steer_plugin.offline import steering_args

    steering = distinct_steerings()[0]
    args = steering_args(eager_llm, steering)
    assert args == steering_args(assets, steering)
    applied = lambda: worker_stats(eager_llm).features_applied.get("demo", 0)  # noqa: E731
    before = applied()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=args)
    eager_llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert applied() == before + 1  # the worker compiled the request's one feature operation


# --- prefix cache ---------------------------------------------------------------------------------------------


def first_logprobs(llm, assets, ids, steering):
    out = llm.generate(
        [token_prompt(ids)], sampling(assets, steering, max_tokens=1, logprobs=5), use_tqdm=False
    )[0]
    return {t: round(lp.logprob, 5) for t, lp in out.outputs[0].logprobs[0].items()}, out.num_cached_tokens


def long_prompt_ids(hf, text: str) -> list[int]:
    return hf.tokenizer(text * 28)["input_ids"]  # ~300 tokens: two or more KV blocks (128 tokens each on CPU)


def test_steered_request_after_unsteered_is_steered_on_every_prompt_token(eager_llm, hf, assets):
    ids = long_prompt_ids(hf, "The bridge over the bay glows orange at sunset. ")
    steering = {
        "features": [
            {"sae": "demo", "index": 123, "op": "add", "value": 0.5, "normalize": True, "positions": "prompt"}
        ]
    }
    eager_llm.reset_prefix_cache()
    fresh, cached_fresh = first_logprobs(eager_llm, assets, ids, steering)
    eager_llm.reset_prefix_cache()
    plain, _ = first_logprobs(eager_llm, assets, ids, None)
    after_plain, cached = first_logprobs(eager_llm, assets, ids, steering)
    assert cached_fresh == 0
    assert cached == 0, "the steered request reused KV blocks computed without its steering"
    assert after_plain == fresh
    assert after_plain != plain
    again, cached_again = first_logprobs(eager_llm, assets, ids, steering)
    assert cached_again > 0 and again == fresh, "identical steering should share its own (salted) cache"


def test_generation_only_steering_keeps_the_prefix_cache(eager_llm, hf, assets):
    ids = long_prompt_ids(hf, "A recipe for bread needs flour, water, salt and time. ")
    steering = {
        "features": [
            {
                "sae": "demo",
                "index": 123,
                "op": "add",
                "value": 0.5,
                "normalize": True,
                "positions": "generation",
            }
        ]
    }
    eager_llm.reset_prefix_cache()
    first_logprobs(eager_llm, assets, ids, None)
    _, cached = first_logprobs(eager_llm, assets, ids, steering)
    assert cached >= len(ids) // 2


def test_multi_turn_after_generation_only_steering_reads_no_steered_kv(eager_llm, hf, assets):
    """Turn 2's prompt = turn 1's prompt + turn 1's steered answer: the blocks holding that answer were
    computed under steering and must not serve an unsteered request; the unsteered prompt prefix still may."""
    from vllm import SamplingParams

    prompt = long_prompt_ids(hf, "Tell me something about rivers and lakes. ")[:140]  # block 0 + part of 1
    steering = {
        "features": [
            {
                "sae": "demo",
                "index": 123,
                "op": "add",
                "value": 0.8,
                "normalize": True,
                "positions": "generation",
            }
        ]
    }
    eager_llm.reset_prefix_cache()
    eager_llm.generate([token_prompt(prompt)], sampling(assets, None, max_tokens=1), use_tqdm=False)
    long = dict(max_tokens=250, ignore_eos=True)
    steered = eager_llm.generate([token_prompt(prompt)], sampling(assets, steering, **long), use_tqdm=False)[
        0
    ]
    assert steered.num_cached_tokens >= 128, (
        "generation-only steering should read the unsteered prompt prefix"
    )
    plain = eager_llm.generate([token_prompt(prompt)], sampling(assets, None, **long), use_tqdm=False)[0]
    answer = list(steered.outputs[0].token_ids)
    assert answer != list(plain.outputs[0].token_ids), "the steering should change the answer"
    turn2 = prompt + answer + hf.tokenizer(" So, in short:")["input_ids"]  # > 3 blocks of 128
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    warm = eager_llm.generate([token_prompt(turn2)], params, use_tqdm=False)[0]
    cold = eager_llm.generate([{"prompt_token_ids": turn2, "cache_salt": "fresh"}], params, use_tqdm=False)[0]
    assert 128 <= warm.num_cached_tokens < 256, (
        f"{warm.num_cached_tokens} tokens cached: only the unsteered prompt block may be shared"
    )
    assert cold.num_cached_tokens == 0
    lp = lambda out: {t: round(v.logprob, 3) for t, v in out.outputs[0].logprobs[0].items()}  # noqa: E731
    assert lp(warm) == lp(cold)


def test_forged_messages_run_unsteered_and_the_engine_survives(eager_llm, assets, plain_outputs):
    """What a client could put in vllm_xargs on any endpoint: unsigned or malformed plugin messages. The
    engine drops them (the request runs unsteered and unobserved), nothing else in the batch changes."""
    from vllm import SamplingParams

    from steer_plugin.request.wire import RESERVED_KEYS, WIRE_KEY

    old_observe_key = RESERVED_KEYS[1]  # wire version 3's observation key: nothing reads it now

    wire = sampling(assets, distinct_steerings()[0]).extra_args[WIRE_KEY]
    forged = [
        {WIRE_KEY: wire.split(".", 1)[1]},  # the signed message without its signature
        {WIRE_KEY: '{"v": 2, "ops": [["feature", "demo", 99999999, 15, 0, 1, 0, 0, 0, "add"]]}'},
        {WIRE_KEY: '["a/b", ["demo"], -1, false]'},  # an observation that killed the engine before (k = -1)
        {WIRE_KEY: "[[[[", old_observe_key: '["a/b", ["demo"], -1, false]'},
    ]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=x) for x in forged]
    prompts = PROMPTS[: len(forged)]
    out = texts(
        eager_llm.generate(
            prompts + PROMPTS, params + [sampling(assets, None, max_tokens=MAX_TOKENS)] * 6, use_tqdm=False
        )
    )
    assert out[: len(forged)] == plain_outputs[: len(forged)]
    assert out[len(forged) :] == plain_outputs
    stats = worker_stats(eager_llm)
    assert stats.rejected_messages.get("steering", 0) >= 4


# --- start-up self-test ---------------------------------------------------------------------------------------


def test_server_refuses_to_start_when_the_op_does_not_fire(demo_assets, steer_config_path):
    """With the layer hook deliberately left out, the self-test must stop the server at start-up."""
    env = {**os.environ, "STEER_PLUGIN_TEST_SKIP_HOOKS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "steer_adapters.vllm.api.launcher",
        "--steer-config",
        steer_config_path,
        "--model",
        str(demo_assets.model_dir),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--port",
        "18931",
        "--host",
        "127.0.0.1",
    ]
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "self-test" in proc.stderr and "never ran" in proc.stderr, proc.stderr[-3000:]
    assert time.time() - started < 600


# --- pipeline parallel ----------------------------------------------------------------------------------------


def test_pipeline_parallel_two_ranks_match_single_rank(eager_llm, demo_assets, steer_config_path, assets):
    """PP=2 on the CPU build: each rank loads only its own layers' SAEs/vectors; outputs equal one rank's."""
    steerings = distinct_steerings()[:3]
    params = [sampling(assets, None, max_tokens=MAX_TOKENS)] + [
        sampling(assets, s, max_tokens=MAX_TOKENS) for s in steerings
    ]
    prompts = PROMPTS[:4]
    single = texts(eager_llm.generate(prompts, params, use_tqdm=False))
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = (
        "0|1"  # one core per rank (the CPU build cannot bind two ranks to one NUMA node)
    )
    try:
        with engine(
            str(demo_assets.model_dir), steer_config_path, enforce_eager=True, pipeline_parallel_size=2
        ) as llm:
            assert texts(llm.generate(prompts, params, use_tqdm=False)) == single
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved

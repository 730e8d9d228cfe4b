"""From a parsed `steering` field to what a request runs with: one pure function, `plan_request`.

The OpenAI server (service.py), its `compare` default variant and the offline `steering_args` all plan through
it, so the steps (resolve against the catalog, the policy on every read, the endpoint's rules, the observation
plan and its cost) are written once. The endpoint's facts are read from the body once (`Endpoint.of`); the
random monitoring sample is an input, so the function itself is deterministic.
"""

from __future__ import annotations

import random
import uuid
from typing import NamedTuple

from steer_plugin.body import lax_int, prompt_count
from steer_plugin.config import SteerConfig
from steer_plugin.observation import ObservationCost
from steer_plugin.request.ops import ResolvedOp
from steer_plugin.request.resolve import (
    Catalog,
    check_inspectable,
    check_policy,
    resolve_feature,
    resolve_spec,
)
from steer_plugin.request.schema import InspectSpec, SpecError, SteeringSpec
from steer_plugin.request.wire import TRACE_THRESHOLD, AbortSpec, ObservePlan, ProbeAbortSpec, WatchSpec

STEERING_FIELD = "steering"

# Body fields asking for structured output: abort_when's forced end-of-sequence token could break it.
STRUCTURED_OUTPUT_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
)


class Endpoint(NamedTuple):
    """What planning needs to know of the endpoint and of the rest of the body, read once from the body."""

    observable: bool  # responses carry per-token features (chat/completions); elsewhere no inspect/monitoring
    choices: int  # n
    prompts: int  # prompts in the body (a batch of completions has several)
    max_tokens: int  # max_completion_tokens or max_tokens; 0 when not given
    beam_search: bool
    ignore_eos: bool
    min_tokens: int
    structured_output: str | None  # the first field asking for structured output, if any

    @classmethod
    def of(cls, body: dict, observable: bool = True) -> Endpoint:
        """The facts of `body` (SpecError naming a malformed integer field)."""
        structured = next(
            (k for k in STRUCTURED_OUTPUT_FIELDS if body.get(k) not in (None, {}, {"type": "text"})), None
        )
        return cls(
            observable=observable,
            choices=lax_int(body, "n", 1),
            prompts=prompt_count(body),
            max_tokens=max(
                0, _int_or_zero(body, "max_completion_tokens") or _int_or_zero(body, "max_tokens")
            ),
            beam_search=body.get("use_beam_search") not in (None, False),
            ignore_eos=body.get("ignore_eos") not in (None, False),
            min_tokens=_int_or_zero(body, "min_tokens"),
            structured_output=structured,
        )

    @classmethod
    def offline(cls) -> Endpoint:
        """vLLM's offline `LLM`: steering only (no HTTP response to report observations in)."""
        return cls(False, 1, 1, 0, False, False, 0, None)

    @property
    def single(self) -> bool:
        """One choice of one prompt: the only shape per-token observations and abort_when can follow."""
        return self.choices == 1 and self.prompts == 1


def _int_or_zero(body: dict, field: str) -> int:
    """A sampling limit as vLLM reads it; 0 when malformed (vLLM's own validation then refuses the body)."""
    try:
        return lax_int(body, field, 0)
    except SpecError:
        return 0


class PlannedRequest(NamedTuple):
    """What a request runs with and reports, before it is bound to a request id and signed."""

    ops: tuple[ResolvedOp, ...] = ()
    observe: ObservePlan | None = None  # what the workers read for it (None: nothing)
    inspect: InspectSpec | None = None
    inspected: tuple[str, ...] = ()  # the SAEs `inspect` reports (the policy applied), as resolved
    traced: tuple[tuple[str, int], ...] = ()  # (sae, index) of inspect.features, in request order
    probes: tuple[str, ...] = ()  # inspect.probes: the probes scored on every token, in request order
    abort: tuple[AbortSpec, ...] = ()  # abort_when conditions on features, in request order
    probe_abort: tuple[ProbeAbortSpec, ...] = ()  # abort_when conditions on probes, in request order
    monitored_probes: tuple[str, ...] = ()  # probes the operator's monitoring samples this request for
    monitored: tuple[str, ...] = ()  # SAEs the operator's monitoring samples this request for
    compare: bool = False  # also serve the default variant (default_variant) beside this one
    # What the client's observation costs (inspect, traces, abort_when; None: it observes nothing), before the
    # server counts the prompt tokens (prompt_tokens 0) and, without max_tokens, the generation (0).
    cost: ObservationCost | None = None

    def default_variant(self) -> PlannedRequest:
        """The default side of `compare`: no steering operations, the same observation under its own correlation id."""
        observe = self.observe._replace(cid=uuid.uuid4().hex) if self.observe is not None else None
        return self._replace(ops=(), observe=observe, compare=False)


def sample_monitored(config: SteerConfig, endpoint: Endpoint, draw=random.random) -> tuple[str, ...]:
    """The SAEs the operator's monitoring samples this request for (each at its sample_rate)."""
    return _sampled(config.monitoring.saes, endpoint, draw)


def sample_monitored_probes(config: SteerConfig, endpoint: Endpoint, draw=random.random) -> tuple[str, ...]:
    """The probes the operator's monitoring samples this request for (each at its sample_rate)."""
    return _sampled(config.monitoring.probes, endpoint, draw)


def _sampled(rates: dict, endpoint: Endpoint, draw) -> tuple[str, ...]:
    if not (endpoint.single and endpoint.observable):
        return ()
    return tuple(key for key, m in rates.items() if m.sample_rate > 0 and draw() < m.sample_rate)


def plan_request(
    spec: SteeringSpec,
    catalog: Catalog,
    config: SteerConfig,
    endpoint: Endpoint,
    monitored: tuple[str, ...] = (),
    monitored_probes: tuple[str, ...] = (),
) -> PlannedRequest:
    """Resolve `spec` against the catalog and the policy for `endpoint`; SpecError (400/403) naming the field."""
    ops = tuple(resolve_spec(spec, catalog, STEERING_FIELD))
    check_policy(spec, list(ops), config.policy, STEERING_FIELD)
    if (ops or spec.inspect is not None) and endpoint.beam_search:
        # vLLM's beam search rebuilds SamplingParams without extra_args: steering would silently not apply.
        raise SpecError("use_beam_search", "beam search cannot be combined with `steering`")
    if spec.compare:
        _needs_observable(endpoint, "compare")
        if not ops:
            raise SpecError(f"{STEERING_FIELD}.compare", "compare needs steering operations to compare with")
    inspect = spec.inspect
    inspected = _inspected(inspect, catalog, endpoint) if inspect is not None else ()
    abort, asked_abort = _abort_conditions(spec, catalog, config, endpoint)
    probe_abort = asked_abort + _operator_aborts(monitored_probes, catalog, config, endpoint)
    traced = []
    for i, ref in enumerate(inspect.features if inspect else []):
        path = f"{STEERING_FIELD}.inspect.features[{i}]"
        sae, index = resolve_feature(ref, catalog, path)
        check_inspectable(config.policy, sae.id, path)
        traced.append((sae.id, index))
    probes = _probes(inspect, catalog) if inspect is not None else ()
    asked = tuple(dict.fromkeys([*inspected, *(sae for sae, _ in traced), *(a.sae for a in abort)]))
    read = tuple(dict.fromkeys([*asked, *monitored]))
    asked_probes = tuple(dict.fromkeys([*probes, *(a.probe for a in asked_abort)]))
    scored = tuple(dict.fromkeys([*asked_probes, *monitored_probes]))
    observe = None
    if read or scored:
        top_k = max(inspect.top_k if inspect else 1, config.monitoring.top_k if monitored else 1)
        watch = [
            WatchSpec(w.sae, w.index, w.threshold) for w in config.monitoring.watchlist if w.sae in monitored
        ] + [WatchSpec(sae, index, TRACE_THRESHOLD) for sae, index in dict.fromkeys(traced)]
        prompt = bool(inspect and inspect.prompt)
        observe = ObservePlan(
            uuid.uuid4().hex, read, top_k, prompt, tuple(watch), monitored, abort, scored, probe_abort
        )
    cost = None
    if asked or asked_probes:  # the client's own observation (monitoring is the operator's): observation.py
        values = (inspect.top_k * len(inspected) if inspect else 0) + len(traced) + len(probes)
        reads = len(asked) + len({catalog.probes[p].layer for p in asked_probes})
        cost = ObservationCost(0, endpoint.max_tokens * max(1, endpoint.choices), reads, values)
    return PlannedRequest(
        ops=ops,
        observe=observe,
        inspect=inspect,
        inspected=inspected,
        traced=tuple(traced),
        probes=probes,
        abort=abort,
        probe_abort=probe_abort,
        monitored_probes=monitored_probes,
        monitored=monitored,
        compare=spec.compare,
        cost=cost,
    )


def _probes(inspect: InspectSpec, catalog: Catalog) -> tuple[str, ...]:
    """inspect.probes, each known to the catalog (400 naming the entry otherwise)."""
    for i, probe_id in enumerate(inspect.probes):
        if probe_id not in catalog.probes:
            raise SpecError(
                f"{STEERING_FIELD}.inspect.probes[{i}]",
                f"unknown probe {probe_id!r}; loaded: {sorted(catalog.probes)}",
            )
    return tuple(dict.fromkeys(inspect.probes))


def _needs_observable(endpoint: Endpoint, field: str) -> None:
    if not endpoint.observable:
        raise SpecError(
            f"{STEERING_FIELD}.{field}", f"{field} is served on /v1/chat/completions and /v1/completions"
        )


def _inspected(inspect: InspectSpec, catalog: Catalog, endpoint: Endpoint) -> tuple[str, ...]:
    """The SAEs `inspect` reports: those it names (none: `saes: []`, to score only probes), or every SAE the
    policy lets requests read."""
    _needs_observable(endpoint, "inspect")
    path = f"{STEERING_FIELD}.inspect"
    for i, sae_id in enumerate(inspect.saes or []):
        if sae_id not in catalog.saes:
            raise SpecError(
                f"{path}.saes[{i}]", f"unknown SAE {sae_id!r}; loaded: {sorted(catalog.readable_saes())}"
            )
    if inspect.saes == [] and not inspect.probes:
        raise SpecError(f"{path}.saes", "name at least one SAE (or leave it out), or ask for probes")
    named = inspect.saes is not None
    inspected = tuple(dict.fromkeys(inspect.saes)) if named else tuple(catalog.readable_saes())
    if not inspected and not inspect.probes:
        raise SpecError(path, "no SAE may be inspected on this server", 403)
    if endpoint.choices != 1:
        raise SpecError(path, "inspect needs n = 1")
    if endpoint.prompts != 1:
        raise SpecError(path, "inspect needs a single prompt")
    return inspected


def _abort_conditions(
    spec: SteeringSpec, catalog: Catalog, config: SteerConfig, endpoint: Endpoint
) -> tuple[tuple[AbortSpec, ...], tuple[ProbeAbortSpec, ...]]:
    """`abort_when`, resolved (on features, on probes); a 400 where the engine could not stop the request at
    the right token."""
    if not spec.abort_when:
        return (), ()
    path = f"{STEERING_FIELD}.abort_when"
    _needs_observable(endpoint, "abort_when")
    if not endpoint.single:
        raise SpecError(path, "abort_when needs n = 1 and a single prompt")
    # The stop is an end-of-sequence token forced in the worker: it must be able to end the request.
    if endpoint.ignore_eos:
        raise SpecError("ignore_eos", "cannot be combined with `steering.abort_when`")
    if endpoint.min_tokens != 0:
        raise SpecError("min_tokens", "cannot be combined with `steering.abort_when`")
    if endpoint.structured_output is not None:
        raise SpecError(
            endpoint.structured_output, "structured output cannot be combined with `steering.abort_when`"
        )
    out, on_probes = [], []
    for i, cond in enumerate(spec.abort_when):
        if cond.probe is not None:
            on_probes.append(_probe_condition(cond, catalog, f"{path}[{i}]"))
            continue
        sae, index = resolve_feature(cond, catalog, f"{path}[{i}]")
        check_inspectable(config.policy, sae.id, f"{path}[{i}]")
        out.append(AbortSpec(sae.id, index, float(cond.threshold), cond.sign))
    return tuple(out), tuple(on_probes)


def _operator_aborts(
    monitored_probes: tuple[str, ...], catalog: Catalog, config: SteerConfig, endpoint: Endpoint
) -> tuple[ProbeAbortSpec, ...]:
    """The operator's stops (monitoring.probes[...].abort_above) on the probes this request is monitored with,
    where the engine can stop it at a token."""
    if endpoint.ignore_eos or endpoint.min_tokens != 0 or endpoint.structured_output is not None:
        return ()
    out = []
    for pid in monitored_probes:
        rule, meta = config.monitoring.probes.get(pid), catalog.probes.get(pid)
        if rule is not None and rule.abort_above is not None and meta is not None:
            column = meta.labels.index(rule.label) if rule.label in meta.labels else 0
            out.append(ProbeAbortSpec(pid, column, rule.abort_above, 1))
    return tuple(out)


def _probe_condition(cond, catalog: Catalog, path: str) -> ProbeAbortSpec:
    meta = catalog.probes.get(cond.probe)
    if meta is None:
        raise SpecError(f"{path}.probe", f"unknown probe {cond.probe!r}; loaded: {sorted(catalog.probes)}")
    label = cond.label if cond.label is not None else meta.labels[0]
    if label not in meta.labels:
        raise SpecError(f"{path}.label", f"probe {cond.probe!r} has the labels {list(meta.labels)}")
    return ProbeAbortSpec(
        cond.probe, meta.labels.index(label), float(cond.threshold), cond.sign, cond.window or 1
    )

"""Server-side request handling, independent of the web framework: the `steering` field of a request.

`SteeringService.rewrite_request(body)` parses the `steering` field (request.schema), plans it against the
loaded sources, the policy and the endpoint (request.plan), and returns the body the inference server should
see: the request's `RequestPlan` (ops, observation, salt) signed under one vllm_xargs key (request.wire). Errors
are `SpecError`s carrying the HTTP status and the JSON path of the bad field. The service also holds what is
loaded (the catalog, swapped whole when the runtime loads change: catalog_sync.py keeps that part a copy of
the workers' registry), its discovery snapshot (discovery.py) and the read-back of observed requests
(readback.py).
`rewrite_current` is `rewrite_request` for a server with several API processes: a request naming a source
loaded at runtime, or an id this process does not know, is planned against a freshly read catalog.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from steer_plugin import metrics
from steer_plugin.admin import Admin, InFlight
from steer_plugin.body import refuse_reserved_keys
from steer_plugin.catalog import LoadedAssets, LoadedProbe, LoadedSAE, LoadedVector, load_assets, probe_meta
from steer_plugin.catalog_sync import Link, Loaded, kind_of
from steer_plugin.config import SteerConfig
from steer_plugin.discovery import Discovery
from steer_plugin.fitting.run import Fitter
from steer_plugin.monitor import inbox as observe_inbox
from steer_plugin.monitor.judge import JudgeCascade, RateLimit, Rule
from steer_plugin.observation import ObservationBudget, ObservationCost
from steer_plugin.readback import Observation
from steer_plugin.request.ops import ResolvedOp
from steer_plugin.request.plan import (
    STEERING_FIELD,
    Endpoint,
    PlannedRequest,
    plan_request,
    sample_monitored,
    sample_monitored_probes,
)
from steer_plugin.request.resolve import check_counts
from steer_plugin.request.schema import InspectSpec, SpecError, SteeringSpec, parse_spec
from steer_plugin.request.wire import MAX_USES, WIRE_KEY, AbortSpec, Binding, ObservePlan, RequestPlan

logger = logging.getLogger("steer_plugin")


class RewrittenRequest(NamedTuple):
    body: dict  # what vLLM sees: `steering` removed, the signed plan in vllm_xargs[WIRE_KEY]
    plan: RequestPlan  # what the engine core and the workers decode from it
    planned: PlannedRequest = PlannedRequest()  # what it runs with and reports (request/plan.py)
    endpoint: Endpoint | None = None  # the body's facts, read once
    user_wants_token_ids: bool = False
    request_id_header: str | None = None  # an X-Request-Id to send with it (the id its plan is bound to)

    @property
    def ops(self) -> tuple[ResolvedOp, ...]:
        return self.plan.ops

    @property
    def observe(self) -> ObservePlan | None:
        return self.plan.observe

    @property
    def inspect(self) -> InspectSpec | None:
        return self.planned.inspect

    @property
    def inspected(self) -> tuple[str, ...]:
        return self.planned.inspected

    @property
    def traced(self) -> tuple[tuple[str, int], ...]:
        return self.planned.traced

    @property
    def probes(self) -> tuple[str, ...]:
        return self.planned.probes

    @property
    def abort(self) -> tuple[AbortSpec, ...]:
        return self.planned.abort

    @property
    def monitored(self) -> tuple[str, ...]:
        return self.planned.monitored

    @property
    def compare(self) -> bool:
        return self.planned.compare

    @property
    def cost(self) -> ObservationCost | None:
        return self.planned.cost


class SteeringService:
    def __init__(self, config: SteerConfig, assets: LoadedAssets | None = None):
        self.config = config
        self.assets = assets or load_assets(config, weights=False)  # SAE headers: no weights here
        self.model_layers: int | None = (
            None  # the model's decoder layers, once the server says (set_model_shape)
        )
        self.probe_revisions: dict[str, str] = {}  # probes loaded at runtime: their load's revision
        self.generation = 0  # of the workers' registry of runtime loads this catalog copies (catalog_sync.py)
        self.catalog = self.assets.catalog(self.runtime_layers())
        self.discovery = Discovery(
            self.assets, self.catalog, self.probe_revisions
        )  # swapped with the catalog
        self.in_flight = InFlight()  # sources running requests use (runtime unloads wait for them)
        limits = config.policy.observation
        self.observation_budget = ObservationBudget(limits.max_cost_in_flight, limits.max_wait_s)
        monitoring = config.monitoring
        self.judge_limits = {  # per probe, per API process (monitor/judge.py)
            pid: RateLimit(rule.judge_per_minute)
            for pid, rule in monitoring.probes.items()
            if rule.judge_above is not None
        }
        self.judge_token = secrets.token_hex(16)  # marks this process's own judge calls (never judged again)
        runtime = config.runtime
        self.admin = Admin(self, runtime) if runtime is not None and runtime.key() else None
        sinks = config.monitoring.sink_positions
        self.fitter = Fitter(self.admin, sinks, lambda: self.model_layers) if self.admin is not None else None

    # --- what is loaded ------------------------------------------------------------------------------------

    def runtime_layers(self) -> tuple[int, ...]:
        """Layers reserved for runtime loads (steered, so inline vectors may go there too)."""
        runtime = self.config.runtime
        return runtime.reserved_layers(self.model_layers) if runtime is not None else ()

    def set_model_shape(self, num_layers: int, d_model: int) -> None:
        """The served model's depth and width (known once the engine is up)."""
        if (self.model_layers, self.assets.model_d_model) != (num_layers, d_model):
            self.model_layers = num_layers
            self.assets = self.assets._replace(model_d_model=d_model)
            self._refresh_catalog()

    def d_model(self) -> int | None:
        return self.assets.d_model()

    def _refresh_catalog(self) -> None:
        self.catalog = self.assets.catalog(self.runtime_layers())  # one swap: resolution sees old or new
        self.discovery = Discovery(self.assets, self.catalog, dict(self.probe_revisions), self.generation)

    def runtime_sources(self) -> dict[tuple[str, str], Loaded]:
        """(kind, id) -> every source loaded at runtime, in load order."""
        saes, vectors = self.assets.saes.values(), self.assets.vectors.values()
        loaded = [("sae", s) for s in saes if s.revision] + [("vector", v) for v in vectors if v.revision]
        loaded += [("probe", self.source("probe", pid)) for pid in self.probe_revisions]
        return {(kind, source.id): source for kind, source in loaded}

    def set_runtime_sources(self, loaded: list[Loaded], generation: int) -> None:
        """The sources loaded at runtime are now `loaded` (in load order; configured ones stay): one swap."""
        assets = self.assets
        saes = {k: s for k, s in assets.saes.items() if not s.revision}
        vectors = {k: v for k, v in assets.vectors.items() if not v.revision}
        probes = {k: p for k, p in assets.probes.items() if k not in self.probe_revisions}
        self.probe_revisions = {}
        for source in loaded:
            kind = kind_of(source)
            if kind == "probe":
                probes[source.id] = source.probe
                self.probe_revisions[source.id] = source.revision
            else:
                (saes if kind == "sae" else vectors)[source.id] = source
        self.assets = assets._replace(saes=saes, vectors=vectors, probes=probes)
        self.generation = generation
        self._refresh_catalog()

    def source(self, kind: str, source_id: str) -> LoadedSAE | LoadedVector | LoadedProbe | None:
        """The loaded SAE, vector or probe `source_id` of `kind` ("sae", "vector", "probe"), or None."""
        if kind == "probe":
            probe = self.assets.probes.get(source_id)
            revision = self.probe_revisions.get(source_id, "")
            return None if probe is None else LoadedProbe(source_id, probe, revision)
        return (self.assets.saes if kind == "sae" else self.assets.vectors).get(source_id)

    def read_layers(self) -> set[int]:
        """Layers whose residual every worker captures besides the reserved ones: an SAE's or a probe's."""
        return {s.layer for s in self.assets.saes.values()} | {
            probe_meta(p).layer for p in self.assets.probes.values()
        }

    def loaded_saes(self) -> dict[str, LoadedSAE]:
        return self.assets.saes

    def probes_reading(self, sae_id: str) -> list[str]:
        return sorted(pid for pid, p in self.assets.probes.items() if probe_meta(p).sae == sae_id)

    def describe(self, kind: str, source_id: str) -> dict:
        """One loaded source as the discovery routes list it."""
        return self.discovery.describe(kind, source_id)

    def remove_source(self, kind: str, source_id: str) -> None:
        if kind == "probe":
            self.assets.probes.pop(source_id, None)
            self.probe_revisions.pop(source_id, None)
        else:
            (self.assets.saes if kind == "sae" else self.assets.vectors).pop(source_id, None)
        self._refresh_catalog()

    def holding(self, request: RewrittenRequest | None):
        """Context in which `request` runs: its sources count as in use (see steer_plugin.admin)."""
        return self.in_flight.holding(InFlight.used_by(request.planned) if request is not None else [])

    async def current(self, link: Link | None) -> bool:
        """The catalog brought to the workers' registry when another API process may have changed it
        (catalog_sync.py); whether it changed. A failed read is logged: this process answers from its copy."""
        if self.admin is None:
            return False
        before = self.catalog
        try:
            await self.admin.sync.current(link)
        except Exception as err:
            logger.warning("steer_plugin: could not read the runtime loads from the workers: %s", err)
        return self.catalog is not before

    def rewrite_request(
        self, body: dict, observable: bool = True, request_id: str | None = None, turns: int = 1
    ) -> RewrittenRequest:
        """Move a valid `steering` field into vllm_xargs; raise SpecError (400/403) naming the bad field.

        `observable`: the endpoint's responses carry per-token features (chat/completions); elsewhere
        (/v1/responses, /v1/messages) steering applies but `inspect` is refused and nothing is monitored.
        `request_id`: the id vLLM will build the request's engine id from; the signed plan is bound to it (and
        to `turns` engine requests per choice and prompt; request/wire.py Binding). None: an unbound plan.
        """
        with _counting_rejections():
            parsed = self._parsed(body, observable)
            return self._finished(body, parsed, self._planned(parsed), request_id, turns)

    async def rewrite_current(
        self, body: dict, link: Link | None, observable=True, request_id: str | None = None, turns: int = 1
    ) -> RewrittenRequest:
        """rewrite_request, where another API process may have loaded or unloaded sources (`link.shared`): a
        request that names a source loaded at runtime, or that the catalog refuses (an id it may not know
        yet), is planned again if a fresh read of the workers' registry changed the catalog
        (catalog_sync.py)."""
        if self.admin is None or link is None or not link.shared:
            return self.rewrite_request(body, observable, request_id, turns)
        with _counting_rejections():
            parsed = self._parsed(body, observable)
            try:
                planned = self._planned(parsed)
                fresh = not self._names_runtime(planned)
            except SpecError:  # maybe an id this copy does not know yet
                planned, fresh = None, False
            if not fresh and (await self.current(link) or planned is None):
                planned = self._planned(parsed)  # on the copy as read (its SpecError, if it still refuses)
            return self._finished(body, parsed, planned, request_id, turns)

    def _names_runtime(self, planned: PlannedRequest) -> bool:
        return any(getattr(self.source(kind, sid), "revision", "") for kind, sid in InFlight.used_by(planned))

    def _parsed(self, body: dict, observable: bool) -> _Parsed:
        refuse_reserved_keys(body)
        if body.get("vllm_xargs") is not None and not isinstance(body["vllm_xargs"], dict):
            raise SpecError("vllm_xargs", "must be an object")
        raw = body.pop(STEERING_FIELD, None)
        check_counts(raw, self.catalog, STEERING_FIELD)  # before anything in it is decoded
        spec = parse_spec(raw, STEERING_FIELD) if raw is not None else SteeringSpec()
        endpoint = Endpoint.of(body, observable)
        monitored = sample_monitored(self.config, endpoint)
        return _Parsed(spec, endpoint, monitored, sample_monitored_probes(self.config, endpoint))

    def _planned(self, parsed: _Parsed) -> PlannedRequest:
        return plan_request(
            parsed.spec, self.catalog, self.config, parsed.endpoint, parsed.monitored, parsed.monitored_probes
        )

    def _finished(
        self, body: dict, parsed: _Parsed, planned: PlannedRequest, request_id: str | None, turns: int
    ) -> RewrittenRequest:
        for op_name in sorted({o.op for o in planned.ops}):
            metrics.STEERED_REQUESTS.labels(op=op_name).inc()
        return self._signed(body, planned, parsed.endpoint, request_id, turns)

    def _signed(
        self, body: dict, planned: PlannedRequest, endpoint: Endpoint, request_id: str | None, turns: int
    ) -> RewrittenRequest:
        """`body` carrying `planned` signed (bound to `request_id`) in vllm_xargs, and what it reports."""
        binding = None
        if request_id is not None:
            # Every engine request that may carry the plan: n choices x prompts (x turns).
            uses = min(MAX_USES, max(1, endpoint.choices) * max(1, endpoint.prompts) * turns)
            binding = Binding.new(request_id, uses)
        observe = planned.observe
        if observe is not None:  # its records come back to this process's inbox
            observe = observe._replace(reply_to=observe_inbox.inbox().address)
        plan = RequestPlan.build(list(planned.ops), observe=observe, binding=binding)
        xargs = dict(body.get("vllm_xargs") or {})
        xargs.pop(WIRE_KEY, None)  # a default variant's body held the steered plan
        if planned.ops or planned.observe is not None:
            xargs[WIRE_KEY] = plan.encode()
        if xargs:
            body["vllm_xargs"] = xargs
        else:  # nothing to carry (a default variant without observation): as if the client sent none
            body.pop("vllm_xargs", None)
        wants_ids = bool(body.get("return_token_ids"))
        if planned.observe is not None:
            body["return_token_ids"] = True  # lets the server align features with each (streamed) token
        return RewrittenRequest(body, plan, planned, endpoint, wants_ids)

    def default_variant(self, steered: RewrittenRequest, request_id: str | None = None) -> RewrittenRequest:
        """The default side of a `compare` request: the same request without steering operations, still
        inspected as asked (bound to `request_id`); nothing is parsed or resolved again."""
        body = copy.deepcopy(steered.body)
        if not steered.user_wants_token_ids:
            body.pop("return_token_ids", None)
        request = self._signed(body, steered.planned.default_variant(), steered.endpoint, request_id, 1)
        return request._replace(user_wants_token_ids=steered.user_wants_token_ids)

    def applied(self, ops: list[ResolvedOp]) -> list[dict]:
        """The operations a response reports as applied."""
        out = []
        for op in ops:
            item = {"op": op.op, "layer": op.layer, "positions": op.positions.describe()}
            if op.kind == "feature":
                item |= {
                    "sae": op.source,
                    "index": op.index,
                    "label": self.catalog.saes[op.source].labels.get(op.index),
                }
            elif op.kind == "inline":
                item |= {"vector": None, "inline": True}
            else:
                item |= {"vector": op.source}
            if op.when is not None:
                bound = "above" if op.when.sign > 0 else "below"
                item["when"] = {"sae": op.when.sae, "index": op.when.index, bound: op.when.threshold}
            out.append(item)
        return out

    def judge_cascade(
        self, request: RewrittenRequest, response_id: Callable[[], str | None], judge_token: str | None
    ) -> JudgeCascade | None:
        """The probe → judge cascade of a monitored request (monitor/judge.py); None when none of its monitored
        probes is judged, or the request is this process's own judge call (`judge_token`)."""
        if judge_token == self.judge_token:
            return None
        monitoring, probes = self.config.monitoring, self.catalog.probes
        rules = []
        for pid in request.planned.monitored_probes:
            rule = monitoring.probes.get(pid)
            if rule is not None and rule.judge_above is not None and pid in probes:
                label = rule.label or probes[pid].labels[0]
                rules.append(Rule(pid, label, probes[pid].labels.index(label), rule))
        if not rules:
            return None
        return JudgeCascade(rules, monitoring, self.judge_limits, request.body, self.judge_token, response_id)

    def observation(self, request: RewrittenRequest) -> Observation | None:
        """The read-back of an observed request (steer_plugin/readback.py); None when it observes nothing."""
        if request.observe is None:
            return None
        catalog = self.catalog
        return Observation(
            request, lambda sae_id: catalog.saes[sae_id].labels, self.config.monitoring, catalog.probes
        )


class _Parsed(NamedTuple):
    """A request's `steering` field and facts, read once (planned again if the catalog changes meanwhile)."""

    spec: SteeringSpec
    endpoint: Endpoint
    monitored: tuple[str, ...]
    monitored_probes: tuple[str, ...]


@contextmanager
def _counting_rejections() -> Iterator[None]:
    try:
        yield
    except SpecError as err:
        metrics.REJECTED_REQUESTS.labels(reason="policy" if err.status == 403 else "invalid").inc()
        raise


def error_body(err: SpecError) -> bytes:
    """OpenAI-style error JSON; `param` is the JSON path of the bad field."""
    kind = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        409: "ConflictError",
        429: "RateLimitError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
        507: "InsufficientStorageError",
    }.get(err.status, "BadRequestError")
    return json.dumps(
        {"error": {"message": str(err), "type": kind, "param": err.path, "code": err.status}}
    ).encode()

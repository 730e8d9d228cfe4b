"""Server-side request handling, independent of the web framework: the `steering` field and discovery.

`SteeringService.rewrite_request(body)` parses the `steering` field (request.schema), resolves it against the
loaded sources and the policy (request.resolve), and returns the body the inference server should see: the
request's `RequestPlan` (ops, observation, salt) signed under one vllm_xargs key (request.wire). Errors are
`SpecError`s carrying the HTTP status and the JSON path of the bad field. `Observation` reads back the
`TokenRecord`s (request.records) the workers write for an observed request.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import NamedTuple

from steer_plugin import metrics
from steer_plugin.admin import Admin, InFlight
from steer_plugin.body import refuse_reserved_keys
from steer_plugin.catalog import LoadedAssets, LoadedSAE, LoadedVector, load_assets
from steer_plugin.config import SteerConfig
from steer_plugin.labels.search import SAETexts, SearchIndex
from steer_plugin.monitor import channel
from steer_plugin.monitor import log as monitor_log
from steer_plugin.observation import ObservationBudget, ObservationCost
from steer_plugin.request.plan import (
    STEERING_FIELD,
    Endpoint,
    PlannedRequest,
    plan_request,
    sample_monitored,
)
from steer_plugin.request.records import TokenRecord
from steer_plugin.request.resolve import check_counts
from steer_plugin.request.schema import InspectSpec, SpecError, SteeringSpec, parse_spec
from steer_plugin.request.wire import (
    MAX_USES,
    POSITION_CODES,
    WIRE_KEY,
    AbortSpec,
    Binding,
    ObservePlan,
    RequestPlan,
    ResolvedOp,
)

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


class TokenRead(NamedTuple):
    """What was read for one token: top-K features per SAE, and the traced features' activations (None where
    no record arrived)."""

    features: dict[str, list[dict]]
    traced: list[float | None]


class SteeringService:
    def __init__(self, config: SteerConfig, assets: LoadedAssets | None = None):
        self.config = config
        self.assets = assets or load_assets(config, weights=False)  # SAE headers: no weights here
        self.model_layers: int | None = (
            None  # the model's decoder layers, once the server says (set_model_shape)
        )
        self.catalog = self.assets.catalog(self.runtime_layers())
        self._search: SearchIndex | None = None  # built on the first feature search
        self.in_flight = InFlight()  # sources running requests use (runtime unloads wait for them)
        limits = config.policy.observation
        self.observation_budget = ObservationBudget(limits.max_cost_in_flight, limits.max_wait_s)
        runtime = config.runtime
        self.admin = Admin(self, runtime) if runtime is not None and runtime.key() else None

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
        self._search = None

    def add_source(self, loaded: LoadedSAE | LoadedVector) -> None:
        table = self.assets.saes if isinstance(loaded, LoadedSAE) else self.assets.vectors
        table[loaded.id] = loaded
        self._refresh_catalog()

    def remove_source(self, kind: str, source_id: str) -> None:
        (self.assets.saes if kind == "sae" else self.assets.vectors).pop(source_id, None)
        self._refresh_catalog()

    def holding(self, request: RewrittenRequest | None):
        """Context in which `request` runs: its sources count as in use (see steer_plugin.admin)."""
        observed = list(request.observe.saes) if request is not None and request.observe is not None else []
        ops = request.ops if request is not None else []
        return self.in_flight.holding(InFlight.sources(ops, observed))

    def rewrite_request(
        self, body: dict, observable: bool = True, request_id: str | None = None, turns: int = 1
    ) -> RewrittenRequest:
        """Move a valid `steering` field into vllm_xargs; raise SpecError (400/403) naming the bad field.

        `observable`: the endpoint's responses carry per-token features (chat/completions); elsewhere
        (/v1/responses, /v1/messages) steering applies but `inspect` is refused and nothing is monitored.
        `request_id`: the id vLLM will build the request's engine id from; the signed plan is bound to it (and
        to `turns` engine requests per choice and prompt; request/wire.py Binding). None: an unbound plan.
        """
        try:
            return self._rewrite(body, observable, request_id, turns)
        except SpecError as err:
            metrics.REJECTED_REQUESTS.labels(reason="policy" if err.status == 403 else "invalid").inc()
            raise

    def _rewrite(self, body: dict, observable: bool, request_id: str | None, turns: int) -> RewrittenRequest:
        refuse_reserved_keys(body)
        if body.get("vllm_xargs") is not None and not isinstance(body["vllm_xargs"], dict):
            raise SpecError("vllm_xargs", "must be an object")
        raw = body.pop(STEERING_FIELD, None)
        check_counts(raw, self.catalog, STEERING_FIELD)  # before anything in it is decoded
        spec = parse_spec(raw, STEERING_FIELD) if raw is not None else SteeringSpec()
        endpoint = Endpoint.of(body, observable)
        monitored = sample_monitored(self.config, endpoint)
        planned = plan_request(spec, self.catalog, self.config, endpoint, monitored)
        for op_name in sorted({o.op for o in planned.ops}):
            metrics.STEERED_REQUESTS.labels(op=op_name).inc()
        return self._signed(body, planned, endpoint, request_id, turns)

    def _signed(
        self, body: dict, planned: PlannedRequest, endpoint: Endpoint, request_id: str | None, turns: int
    ) -> RewrittenRequest:
        """`body` carrying `planned` signed (bound to `request_id`) in vllm_xargs, and what it reports."""
        binding = None
        if request_id is not None:
            # Every engine request that may carry the plan: n choices x prompts (x turns).
            uses = min(MAX_USES, max(1, endpoint.choices) * max(1, endpoint.prompts) * turns)
            binding = Binding.new(request_id, uses)
        plan = RequestPlan.build(list(planned.ops), planned.observe, binding)
        xargs = dict(body.get("vllm_xargs") or {})
        xargs.pop(WIRE_KEY, None)  # a default variant's body held the steered plan
        if planned.ops or planned.observe is not None:
            xargs[WIRE_KEY] = plan.encode()
        if xargs or "vllm_xargs" in body:
            body["vllm_xargs"] = xargs
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
            item = {"op": op.op, "layer": op.layer, "positions": position_name(op)}
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
            if op.cond_sign:
                bound = "above" if op.cond_sign > 0 else "below"
                item["when"] = {"sae": op.cond_source, "index": op.cond_index, bound: op.cond_threshold}
            out.append(item)
        return out

    def observation(self, request: RewrittenRequest) -> Observation | None:
        return Observation(self, request) if request.observe is not None else None

    # --- discovery -----------------------------------------------------------------------------------------

    def describe(self, kind: str, source_id: str) -> dict:
        """One loaded SAE or vector, as GET /v1/steering/saes lists it."""
        if kind == "vector":
            v = self.assets.vectors[source_id]
            return {"id": v.id, "layer": v.layer, "d_model": v.vector.numel(), "revision": v.revision or None}
        s = self.assets.saes[source_id]
        meta = s.sae.metadata
        return {
            "id": s.id,
            "layer": s.layer,
            "hook_name": meta.hook_name or f"blocks.{s.layer}.hook_resid_post",
            "d_in": s.sae.d_in,
            "d_sae": s.sae.d_sae,
            "architecture": s.sae.architecture,
            "format": meta.format,
            "neuronpedia_id": s.neuronpedia_id,
            "num_labels": len(s.labels),
            "num_explained": len(s.explanations),
            "revision": s.revision or None,
        }

    def list_saes(self) -> dict:
        """Loaded SAEs requests may read (the policy's denied SAEs are not listed) and vectors."""
        return {
            "object": "list",
            "data": [self.describe("sae", sid) for sid in self.assets.saes if self.catalog.may_read(sid)],
            "vectors": [self.describe("vector", vid) for vid in self.assets.vectors],
        }

    def search_features(
        self, sae: str | None, query: str | None, limit: int = 20, index: int | None = None
    ) -> dict:
        """Features whose label or explanations match `query`, best match first (steer_plugin.labels.search);
        with `index` (and `sae`), that one feature whatever its texts."""
        readable = [sid for sid in self.assets.saes if self.catalog.may_read(sid)]
        if sae is not None and sae not in readable:
            if sae in self.assets.saes:
                raise SpecError("sae", f"SAE {sae!r} may not be read on this server", status=403)
            raise SpecError("sae", f"unknown SAE {sae!r}; loaded: {readable}", status=404)
        if not 1 <= limit <= 1000:
            raise SpecError("limit", "must be between 1 and 1000")
        if index is not None:
            if sae is None:
                raise SpecError("index", "give `sae` with `index`")
            loaded = self.assets.saes[sae]
            if not 0 <= index < loaded.sae.d_sae:
                raise SpecError(
                    "index", f"out of range: SAE {sae!r} has {loaded.sae.d_sae} features", status=404
                )
            item = {
                "sae": sae,
                "index": index,
                "label": loaded.labels.get(index),
                "explanations": [e.to_json() for e in loaded.explanations.get(index, ())],
                "max_activation": loaded.max_activations.get(index),
            }
            return {"object": "list", "data": [item], "total": 1}
        if self._search is None:
            self._search = SearchIndex(
                SAETexts(s.id, s.labels, s.explanations, s.max_activations)
                for s in self.assets.saes.values()
                if s.id in readable
            )
        hits = self._search.search(query or "", sae)
        return {"object": "list", "data": [h.to_json() for h in hits[:limit]], "total": len(hits)}


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


def position_name(op: ResolvedOp) -> str | dict:
    names = {code: name for name, code in POSITION_CODES.items()}
    name = names[op.positions]
    return {"last_prompt_tokens": op.last_n} if name == "last_prompt_tokens" else name


class Observation:
    """One observed request on the API side: reads its workers' records and formats them per token."""

    def __init__(self, service: SteeringService, request: RewrittenRequest):
        self.service = service
        self.request = request
        channel.create(request.observe.cid)
        self.reader = channel.ChannelReader(request.observe.cid)
        self.by_pos: dict[int, dict[str, TokenRecord]] = {}  # pos -> sae -> its record
        self.records: list[TokenRecord] = []
        self.prompt_len: int | None = None
        self.next_token = 0
        self.aborted: TokenRecord | None = None  # the record of the first abort_when condition that fired
        self.sinks: set[int] = set()  # positions the workers flagged as attention sinks

    def _pull(self) -> None:
        for r in self.reader.read_new():
            self.records.append(r)
            self.prompt_len = r.num_prompt
            if r.sink:
                self.sinks.add(r.pos)
            if r.abort is not None and (self.aborted is None or r.pos < self.aborted.pos):
                self.aborted = r
            self.by_pos.setdefault(r.pos, {})[r.sae] = r

    def _token(self, pos: int) -> TokenRead:
        inspect = self.request.inspect
        found = self.by_pos.get(pos, {})
        features = {}
        for sae_id in self.request.inspected:
            labels = self.service.catalog.saes[sae_id].labels
            top = found[sae_id].top if sae_id in found else ()
            features[sae_id] = [
                {"index": i, "activation": a, "label": labels.get(i)} for i, a in top[: inspect.top_k]
            ]
        watched = {sae_id: dict(r.watch) for sae_id, r in found.items()}
        traced = [watched.get(sae_id, {}).get(index) for sae_id, index in self.request.traced]
        metrics.OBSERVATION_VALUES.inc(sum(map(len, features.values())) + len(traced))
        return TokenRead(features, traced)

    def next_tokens(self, count: int) -> list[TokenRead]:
        """The next `count` generated tokens (each read from the residual that predicted it)."""
        self._pull()
        if self.prompt_len is None:
            self.next_token += count
            return [TokenRead({}, [None] * len(self.request.traced)) for _ in range(count)]
        out = [self._token(self.prompt_len - 1 + k) for k in range(self.next_token, self.next_token + count)]
        self.next_token += count
        return out

    def prompt_tokens(self) -> list[TokenRead]:
        self._pull()
        if self.prompt_len is None:
            return []
        return [self._token(p) for p in range(self.prompt_len)]

    def abort(self) -> dict | None:
        """Which abort_when condition stopped the request and at which generated token (the token that was not
        generated: index k = the k-th generated token, read from the residual that would have predicted it)."""
        self._pull()
        if self.aborted is None or self.prompt_len is None:
            return None
        index, activation = self.aborted.abort
        sae_id = self.aborted.sae
        cond = next((a for a in self.request.abort if a.sae == sae_id and a.index == index), None)
        bound = "above" if cond is None or cond.sign > 0 else "below"
        return {
            "sae": sae_id,
            "index": index,
            "label": self.service.catalog.saes[sae_id].labels.get(index),
            "activation": activation,
            bound: None if cond is None else cond.threshold,
            "token": self.aborted.pos - (self.prompt_len - 1),
        }

    def traced_features(self) -> list[dict]:
        """The features `traced` reports, in order."""
        return [
            {"sae": sae_id, "index": index, "label": self.service.catalog.saes[sae_id].labels.get(index)}
            for sae_id, index in self.request.traced
        ]

    def finish(self, response_id: str | None, model: str | None) -> None:
        """Write the monitoring line and watchlist counts; drop the side-channel file."""
        abort = self.abort()  # (reads what is left first)
        self.reader.remove()
        config = self.service.config.monitoring
        if abort is not None:  # every stopped request is counted and logged, sampled or not
            metrics.ABORTED_REQUESTS.labels(sae=abort["sae"]).inc()
            monitor_log.write(
                config, {"event": "abort", "request_id": response_id, "model": model, "abort": abort}
            )
        for sae_id in self.request.monitored:
            labels = self.service.catalog.saes[sae_id].labels
            # Attention sinks (config monitoring.sink_positions) carry no meaning: left out of every figure.
            records = [r for r in self.records if r.sae == sae_id and not r.sink]
            sinks = sum(1 for r in self.records if r.sae == sae_id and r.sink)
            watch = []
            for w in (w for w in config.watchlist if w.sae == sae_id):
                # The workers test every watched feature on every token (not just the top K).
                fired = sum(1 for r in records if any(i == w.index and a > w.threshold for i, a in r.watch))
                if fired:
                    metrics.WATCHLIST_FIRINGS.labels(sae=sae_id, feature=str(w.index)).inc(fired)
                    watch.append(
                        {
                            "index": w.index,
                            "label": labels.get(w.index),
                            "threshold": w.threshold,
                            "tokens": fired,
                        }
                    )
            metrics.MONITORED_REQUESTS.labels(sae=sae_id).inc()
            monitor_log.write(
                config,
                {
                    "request_id": response_id,
                    "model": model,
                    "sae": sae_id,
                    "num_tokens": len(records),
                    "sink_tokens": sinks,
                    "steered": bool(self.request.ops),
                    "top_features": monitor_log.summarise(records, sae_id, labels, config.top_k),
                    "watchlist": watch,
                    "abort": abort,
                },
            )

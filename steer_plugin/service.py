"""Server-side request handling, independent of the web framework: the `steering` field and discovery.

`SteeringService.rewrite_request(body)` parses the `steering` field (request.schema), resolves it against the
loaded sources and the policy (request.resolve), and returns the body the inference server should see: the
request's `RequestPlan` (ops, observation, salt) signed under one vllm_xargs key (request.wire). Errors are
`SpecError`s carrying the HTTP status and the JSON path of the bad field. `Observation` reads back the
`TokenRecord`s (request.records) the workers write for an observed request.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from typing import NamedTuple

from steer_plugin import metrics
from steer_plugin.admin import Admin, InFlight
from steer_plugin.body import lax_int, prompt_count, refuse_reserved_keys
from steer_plugin.catalog import LoadedAssets, LoadedSAE, LoadedVector, load_assets
from steer_plugin.config import SteerConfig
from steer_plugin.labels.search import SAETexts, SearchIndex
from steer_plugin.monitor import channel
from steer_plugin.monitor import log as monitor_log
from steer_plugin.observation import ObservationBudget, ObservationCost
from steer_plugin.request.records import TokenRecord
from steer_plugin.request.resolve import (
    check_counts,
    check_inspectable,
    check_policy,
    resolve_feature,
    resolve_spec,
)
from steer_plugin.request.schema import InspectSpec, SpecError, SteeringSpec, parse_spec
from steer_plugin.request.wire import (
    MAX_USES,
    TRACE_THRESHOLD,
    WIRE_KEY,
    AbortSpec,
    Binding,
    ObservePlan,
    RequestPlan,
    ResolvedOp,
    WatchSpec,
)

logger = logging.getLogger("steer_plugin")

STEERING_FIELD = "steering"


class RewrittenRequest(NamedTuple):
    body: dict  # what vLLM sees: `steering` removed, the signed plan in vllm_xargs[WIRE_KEY]
    plan: RequestPlan  # what the engine core and the workers decode from it
    inspect: InspectSpec | None = None
    monitored: tuple[str, ...] = ()
    user_wants_token_ids: bool = False
    traced: tuple[tuple[str, int], ...] = ()  # (sae, index) of inspect.features, in request order
    compare: bool = False  # also serve the default variant (default_variant) beside this one
    abort: tuple[AbortSpec, ...] = ()  # abort_when conditions, in request order
    inspected: tuple[str, ...] = ()  # the SAEs `inspect` reports (the policy applied), as resolved
    request_id_header: str | None = None  # an X-Request-Id to send with it (the id its plan is bound to)
    # What the client's observation costs (inspect, traces, abort_when; None: it observes nothing), before the
    # server counts the prompt tokens (prompt_tokens 0) and, without max_tokens, the generation (0).
    cost: ObservationCost | None = None

    @property
    def ops(self) -> tuple[ResolvedOp, ...]:
        return self.plan.ops

    @property
    def observe(self) -> ObservePlan | None:
        return self.plan.observe


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
        if runtime is None:
            return ()
        if runtime.layers == "any":
            return tuple(range(self.model_layers)) if self.model_layers is not None else ()
        return tuple(runtime.layers)

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
        xargs = body.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise SpecError("vllm_xargs", "must be an object")
        xargs = dict(xargs or {})
        raw = body.pop(STEERING_FIELD, None)
        check_counts(raw, self.catalog, STEERING_FIELD)  # before anything in it is decoded
        spec = parse_spec(raw, STEERING_FIELD) if raw is not None else SteeringSpec()
        ops = resolve_spec(spec, self.catalog, STEERING_FIELD)
        check_policy(spec, ops, self.config.policy, STEERING_FIELD)
        n = lax_int(body, "n", 1)
        single = n == 1 and prompt_count(body) == 1
        if (ops or spec.inspect is not None) and body.get("use_beam_search") not in (None, False):
            # vLLM's beam search rebuilds SamplingParams without extra_args: steering would silently not apply.
            raise SpecError("use_beam_search", "beam search cannot be combined with `steering`")
        if spec.compare:
            if not observable:
                raise SpecError(
                    f"{STEERING_FIELD}.compare",
                    "compare is served on /v1/chat/completions and /v1/completions",
                )
            if not ops:
                raise SpecError(
                    f"{STEERING_FIELD}.compare", "compare needs steering operations to compare with"
                )
        inspect = spec.inspect
        inspected: list[str] = []
        if inspect is not None:
            if not observable:
                raise SpecError(
                    f"{STEERING_FIELD}.inspect",
                    "inspect is served on /v1/chat/completions and /v1/completions",
                )
            for i, sae_id in enumerate(inspect.saes or []):
                if sae_id not in self.catalog.saes:
                    raise SpecError(
                        f"{STEERING_FIELD}.inspect.saes[{i}]",
                        f"unknown SAE {sae_id!r}; loaded: {sorted(self.catalog.readable_saes())}",
                    )
            # Without `saes`: every SAE the policy lets requests read (never a denied one).
            inspected = list(dict.fromkeys(inspect.saes)) if inspect.saes else self.catalog.readable_saes()
            if not inspected:
                raise SpecError(f"{STEERING_FIELD}.inspect", "no SAE may be inspected on this server", 403)
            if n != 1:
                raise SpecError(f"{STEERING_FIELD}.inspect", "inspect needs n = 1")
            if prompt_count(body) != 1:
                raise SpecError(f"{STEERING_FIELD}.inspect", "inspect needs a single prompt")
        abort = self._abort_conditions(spec, body, observable, n, single)
        traced = []
        for i, ref in enumerate(inspect.features if inspect else []):
            path = f"{STEERING_FIELD}.inspect.features[{i}]"
            sae, index = resolve_feature(ref, self.catalog, path)
            check_inspectable(self.config.policy, sae.id, path)
            traced.append((sae.id, index))
        monitored = (
            tuple(
                sae_id
                for sae_id, m in self.config.monitoring.saes.items()
                if m.sample_rate > 0 and random.random() < m.sample_rate
            )
            if single and observable
            else ()
        )
        if ops:
            for op_name in sorted({o.op for o in ops}):
                metrics.STEERED_REQUESTS.labels(op=op_name).inc()
        observe = None
        read = list(
            dict.fromkeys(
                [
                    *inspected,
                    *(sae for sae, _ in traced),
                    *(a.sae for a in abort),
                    *monitored,
                ]
            )
        )
        if read:
            top_k = max(inspect.top_k if inspect else 1, self.config.monitoring.top_k if monitored else 1)
            watch = [
                WatchSpec(w.sae, w.index, w.threshold)
                for w in self.config.monitoring.watchlist
                if w.sae in monitored
            ] + [WatchSpec(sae, index, TRACE_THRESHOLD) for sae, index in dict.fromkeys(traced)]
            observe = ObservePlan(
                uuid.uuid4().hex,
                tuple(read),
                top_k,
                bool(inspect and inspect.prompt),
                tuple(watch),
                tuple(monitored),
                tuple(abort),
            )
        cost = None
        asked = list(dict.fromkeys([*inspected, *(sae for sae, _ in traced), *(a.sae for a in abort)]))
        if asked:  # the client's own observation (monitoring is the operator's): steer_plugin/observation.py
            generated = lax_int(body, "max_completion_tokens", 0) or lax_int(body, "max_tokens", 0)
            values = (inspect.top_k * len(inspected) if inspect else 0) + len(traced)
            cost = ObservationCost(0, max(0, generated) * max(1, n), len(asked), values)
        binding = None
        if request_id is not None:
            # Every engine request that may carry the plan: n choices x prompts (x turns).
            uses = min(MAX_USES, max(1, n) * max(1, prompt_count(body)) * turns)
            binding = Binding.new(request_id, uses)
        plan = RequestPlan.build(ops, observe=observe, binding=binding)
        if ops or observe is not None:
            xargs[WIRE_KEY] = plan.encode()
        if xargs:
            body["vllm_xargs"] = xargs
        wants_ids = bool(body.get("return_token_ids"))
        if observe is not None:
            body["return_token_ids"] = True  # lets the server align features with each (streamed) token
        return RewrittenRequest(
            body,
            plan,
            inspect,
            monitored,
            wants_ids,
            tuple(traced),
            spec.compare,
            tuple(abort),
            tuple(inspected),
            cost=cost,
        )

    def _abort_conditions(
        self, spec: SteeringSpec, body: dict, observable: bool, n: int, single: bool
    ) -> list[AbortSpec]:
        """`abort_when`, resolved; a 400 where the engine could not stop the request at the right token."""
        if not spec.abort_when:
            return []
        path = f"{STEERING_FIELD}.abort_when"
        if not observable:
            raise SpecError(path, "abort_when is served on /v1/chat/completions and /v1/completions")
        if not single:
            raise SpecError(path, "abort_when needs n = 1 and a single prompt")
        # The stop is an end-of-sequence token forced in the worker: it must be able to end the request.
        if body.get("ignore_eos") not in (None, False):
            raise SpecError("ignore_eos", "cannot be combined with `steering.abort_when`")
        if lax_int(body, "min_tokens", 0) != 0:
            raise SpecError("min_tokens", "cannot be combined with `steering.abort_when`")
        for key in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice"):
            value = body.get(key)
            if value not in (None, {}, {"type": "text"}):
                raise SpecError(key, "structured output cannot be combined with `steering.abort_when`")
        out = []
        for i, cond in enumerate(spec.abort_when):
            sae, index = resolve_feature(cond, self.catalog, f"{path}[{i}]")
            check_inspectable(self.config.policy, sae.id, f"{path}[{i}]")
            out.append(AbortSpec(sae.id, index, float(cond.threshold), cond.sign))
        return out

    def default_variant(self, body: dict, request_id: str | None = None) -> RewrittenRequest:
        """The default side of a `compare` request (`body` as the client sent it): the same request without
        steering operations, still inspected as asked (bound to `request_id`)."""
        steering = body.get(STEERING_FIELD)
        body = dict(body)
        if isinstance(steering, dict) and steering.get("inspect") is not None:
            body[STEERING_FIELD] = {"inspect": steering["inspect"]}
        else:
            body.pop(STEERING_FIELD, None)
        return self.rewrite_request(body, request_id=request_id)

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

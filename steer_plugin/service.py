"""Server-side request handling, independent of the web framework: the `steering` field and discovery.

`SteeringService.rewrite_request(body)` validates and resolves a completion request's `steering` field and
returns the body the inference server should see (the resolved ops in vllm_xargs). Errors are `SpecError`s
carrying the HTTP status and the JSON path of the bad field.
"""

from __future__ import annotations

import json
import logging
from typing import NamedTuple

from steer_plugin.catalog import LoadedAssets, load_assets
from steer_plugin.config import SteerConfig
from steer_plugin.spec import WIRE_KEY, ResolvedOp, SpecError, encode_wire, parse_spec, resolve_spec

logger = logging.getLogger("steer_plugin")

STEERING_FIELD = "steering"


class RewrittenRequest(NamedTuple):
    body: dict
    ops: list[ResolvedOp]


class SteeringService:
    def __init__(self, config: SteerConfig, assets: LoadedAssets | None = None):
        self.config = config
        self.assets = assets or load_assets(config)
        self.catalog = self.assets.catalog()

    def rewrite_request(self, body: dict) -> RewrittenRequest:
        """Move a valid `steering` field into vllm_xargs; raise SpecError (400) naming the bad field."""
        if STEERING_FIELD not in body:
            return RewrittenRequest(body, [])
        raw = body.pop(STEERING_FIELD)
        if raw is None:
            return RewrittenRequest(body, [])
        spec = parse_spec(raw, STEERING_FIELD)
        ops = resolve_spec(spec, self.catalog, STEERING_FIELD)
        if spec.inspect is not None:
            for i, sae_id in enumerate(spec.inspect.saes or []):
                if sae_id not in self.catalog.saes:
                    raise SpecError(f"{STEERING_FIELD}.inspect.saes[{i}]", f"unknown SAE {sae_id!r}; loaded: {sorted(self.catalog.saes)}")
        xargs = body.get("vllm_xargs") or {}
        if not isinstance(xargs, dict):
            raise SpecError("vllm_xargs", "must be an object")
        if WIRE_KEY in xargs:
            raise SpecError(f"vllm_xargs.{WIRE_KEY}", "is reserved for the steering plugin; use `steering`")
        if ops:
            xargs[WIRE_KEY] = encode_wire(ops)
            body["vllm_xargs"] = xargs
        return RewrittenRequest(body, ops)

    # --- discovery -----------------------------------------------------------------------------------------

    def list_saes(self) -> dict:
        data = []
        for s in self.assets.saes.values():
            meta = s.sae.metadata
            data.append(
                {
                    "id": s.id,
                    "layer": s.layer,
                    "hook_name": meta.hook_name or f"blocks.{s.layer}.hook_resid_post",
                    "d_in": s.sae.d_in,
                    "d_sae": s.sae.d_sae,
                    "architecture": s.sae.architecture,
                    "format": meta.format,
                    "neuronpedia_id": s.neuronpedia_id,
                    "num_labels": len(s.labels),
                }
            )
        vectors = [{"id": v.id, "layer": v.layer, "d_model": v.vector.numel()} for v in self.assets.vectors.values()]
        return {"object": "list", "data": data, "vectors": vectors}

    def search_features(self, sae: str | None, query: str | None, limit: int = 20) -> dict:
        if sae is not None and sae not in self.assets.saes:
            raise SpecError("sae", f"unknown SAE {sae!r}; loaded: {sorted(self.assets.saes)}", status=404)
        if not 1 <= limit <= 1000:
            raise SpecError("limit", "must be between 1 and 1000")
        needle = (query or "").strip().lower()
        hits = []
        for s in self.assets.saes.values():
            if sae is not None and s.id != sae:
                continue
            for index, label in sorted(s.labels.items()):
                if needle in label.lower():
                    hits.append({"sae": s.id, "index": index, "label": label, "exact": label.lower() == needle})
        hits.sort(key=lambda h: (not h["exact"], len(h["label"]), h["sae"], h["index"]))
        return {"object": "list", "data": hits[:limit], "total": len(hits)}


def error_body(err: SpecError) -> bytes:
    """OpenAI-style error JSON; `param` is the JSON path of the bad field."""
    kind = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError"}.get(err.status, "BadRequestError")
    return json.dumps({"error": {"message": str(err), "type": kind, "param": err.path, "code": err.status}}).encode()

"""Discovery: what GET /v1/steering/saes and /v1/steering/features answer, from one snapshot of the catalog.

A `Discovery` is built whenever the loaded sources change (SteeringService swaps it with the catalog), so a
request sees the old or the new set, never a mix; the feature search index is built on the first search.
"""

from __future__ import annotations

from steer_plugin.catalog import LoadedAssets
from steer_plugin.labels.search import SAETexts, SearchIndex
from steer_plugin.request.resolve import Catalog
from steer_plugin.request.schema import SpecError


class Discovery:
    def __init__(
        self,
        assets: LoadedAssets,
        catalog: Catalog,
        probe_revisions: dict[str, str] | None = None,
        generation: int = 0,
    ):
        self.assets = assets
        self.catalog = catalog  # for the policy: denied SAEs are neither listed nor searched
        self.probe_revisions = probe_revisions or {}  # probes loaded at runtime: their revision
        self.generation = generation  # of the workers' registry of runtime loads (catalog_sync.py)
        self._search: SearchIndex | None = None  # built on the first feature search

    def describe(self, kind: str, source_id: str) -> dict:
        """One loaded SAE, vector or probe, as GET /v1/steering/saes lists it."""
        if kind == "probe":
            meta = self.catalog.probes[source_id]
            return {
                "id": source_id,
                "layer": meta.layer,
                "labels": list(meta.labels),
                "activation": meta.activation,
                "window": meta.window,
                "sae": meta.sae,
                "revision": self.probe_revisions.get(source_id) or None,
            }
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
            "probes": [self.describe("probe", pid) for pid in self.catalog.probes],
            "generation": self.generation,
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

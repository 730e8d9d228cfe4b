"""Resolution of a parsed `steering` field against what the server loaded, and the operator's policy.

`resolve_spec` turns the features and vectors a request names into `ResolvedOp`s (layer, bank entry,
coefficients; see `steer_plugin.request.wire`) or raises a `SpecError` naming the bad field (400);
`check_policy` then refuses what this server's policy forbids (403).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

from steer_plugin.config import PolicyConfig
from steer_plugin.request.ops import (
    POSITION_CODES,
    Coefficients,
    InlineVector,
    PositionRule,
    ResolvedOp,
    When,
)
from steer_plugin.request.schema import (
    Condition,
    FeatureRef,
    LastPromptTokens,
    Positions,
    SpecError,
    SteeringSpec,
    inline_vector,
)

if TYPE_CHECKING:
    from steer_plugin.probes.format import ProbeMeta

# A feature index written in text: ASCII digits only (str.isdigit and int() also take "²" and "٣").
ASCII_INDEX = re.compile(r"[0-9]{1,18}")


class SAEInfo(NamedTuple):
    """What request resolution needs to know about a loaded SAE."""

    id: str
    layer: int
    d_sae: int
    neuronpedia_id: str | None
    labels: dict[int, str]
    revision: str = ""  # loaded at runtime: that load's revision ("" for configured SAEs)


class VectorInfo(NamedTuple):
    id: str
    layer: int
    revision: str = ""  # loaded at runtime: that load's revision ("" for configured vectors)


class Catalog(NamedTuple):
    saes: dict[str, SAEInfo]
    vectors: dict[str, VectorInfo]
    max_ops_per_request: int = 32
    max_ops_per_layer: int = 8
    max_abs_value: float = 1e4
    d_model: int | None = None  # residual width (inline vectors must have it)
    layers: tuple[int, ...] = ()  # layers the server steers (inline vectors may target these)
    policy: PolicyConfig | None = None  # the operator's policy: which SAEs requests may read at all
    probes: dict[str, ProbeMeta] = {}  # the probes requests may score (their probe.json)

    def may_read(self, sae_id: str) -> bool:
        return self.policy is None or self.policy.may_read(sae_id)

    def readable_saes(self) -> list[str]:
        """The SAEs requests may read, in catalog order (what `inspect` reads when it names none)."""
        return [sae_id for sae_id in self.saes if self.may_read(sae_id)]


def _positions(p: Positions | LastPromptTokens) -> PositionRule:
    if isinstance(p, LastPromptTokens):
        return PositionRule(code=POSITION_CODES["last_prompt_tokens"], last_n=p.last_prompt_tokens)
    return PositionRule(code=POSITION_CODES[p])


def _condition(cond: Condition | None, layer: int, catalog: Catalog, path: str) -> When | None:
    """ResolvedOp.when of an operation at `layer` (None: always)."""
    if cond is None:
        return None
    sae, index = resolve_feature(cond, catalog, f"{path}.when")
    if sae.layer != layer:
        raise SpecError(
            f"{path}.when",
            f"the condition's feature is read at layer {sae.layer}, the operation applies at layer {layer}; "
            "they must be at the same layer",
        )
    if abs(cond.threshold) > catalog.max_abs_value:
        raise SpecError(
            f"{path}.when.{'above' if cond.sign > 0 else 'below'}", f"must be <= {catalog.max_abs_value:g}"
        )
    return When(
        sae=sae.id, index=index, sign=cond.sign, threshold=float(cond.threshold), revision=sae.revision
    )


def _find_feature(op: FeatureRef, catalog: Catalog, path: str) -> tuple[SAEInfo, int]:
    if op.id is not None:
        source, _, index_text = op.id.rpartition("/")
        matches = [s for s in catalog.saes.values() if s.neuronpedia_id and s.neuronpedia_id == source]
        if not source or not ASCII_INDEX.fullmatch(index_text):
            raise SpecError(f"{path}.id", "must look like `model/source/index` (index: ASCII digits)")
        if not matches:
            known = sorted(
                s.neuronpedia_id for s in catalog.saes.values() if s.neuronpedia_id and catalog.may_read(s.id)
            )
            raise SpecError(f"{path}.id", f"unknown source {source!r}; loaded: {known}")
        return matches[0], int(index_text)
    if op.sae is not None and op.sae not in catalog.saes:
        raise SpecError(f"{path}.sae", f"unknown SAE {op.sae!r}; loaded: {sorted(catalog.readable_saes())}")
    # Without `sae`, a label is looked up in the SAEs the policy lets requests read only.
    candidates = (
        [catalog.saes[op.sae]]
        if op.sae is not None
        else [s for s in catalog.saes.values() if catalog.may_read(s.id)]
    )
    if not candidates:
        raise SpecError(f"{path}.label", "no SAE may be read on this server", status=403)
    if op.label is not None:
        hits = [(s, i) for s in candidates for i, lab in s.labels.items() if lab == op.label]
        if not hits:
            raise SpecError(f"{path}.label", f"no feature is labelled {op.label!r}")
        if len(hits) > 1:
            where = ", ".join(f"{s.id}/{i}" for s, i in hits[:5])
            raise SpecError(f"{path}.label", f"label {op.label!r} is not unique ({where}); use sae + index")
        return hits[0]
    return candidates[0], op.index


def resolve_feature(ref: FeatureRef, catalog: Catalog, path: str) -> tuple[SAEInfo, int]:
    """The loaded SAE and feature index a reference names; SpecError naming `path` otherwise (403 where the
    policy keeps requests from reading the SAE: every use of a feature, steered, conditioned on, traced or
    stopped on, is resolved here)."""
    sae, index = _find_feature(ref, catalog, path)
    if not catalog.may_read(sae.id):
        raise SpecError(path, f"SAE {sae.id!r} may not be read on this server", status=403)
    if not 0 <= index < sae.d_sae:
        field = "id" if ref.id is not None else "index"
        raise SpecError(
            f"{path}.{field}",
            f"feature index {index} out of range for SAE {sae.id!r} (0..{sae.d_sae - 1})",
        )
    return sae, index


def resolve_spec(spec: SteeringSpec, catalog: Catalog, prefix: str = "steering") -> list[ResolvedOp]:
    """Check a parsed spec against the catalog and limits; SpecError names the bad field."""
    ops: list[ResolvedOp] = []
    for i, op in enumerate(spec.features):
        path = f"{prefix}.features[{i}]"
        sae, index = resolve_feature(op, catalog, path)
        if op.value is not None and abs(op.value) > catalog.max_abs_value:
            raise SpecError(f"{path}.value", f"|value| must be <= {catalog.max_abs_value:g}")
        ops.append(
            ResolvedOp(
                kind="feature",
                op=op.op,
                layer=sae.layer,
                coef=Coefficients.of_feature_op(op.op, op.value, op.normalize),
                source=sae.id,
                index=index,
                positions=_positions(op.positions),
                when=_condition(op.when, sae.layer, catalog, path),
                revision=sae.revision,
            )
        )
    for i, op in enumerate(spec.vectors):
        path = f"{prefix}.vectors[{i}]"
        if abs(op.scale) > catalog.max_abs_value:
            raise SpecError(f"{path}.scale", f"|scale| must be <= {catalog.max_abs_value:g}")
        coef = Coefficients.of_vector(op.scale, op.normalize)
        if op.inline:
            if op.layer not in catalog.layers:
                raise SpecError(
                    f"{path}.layer",
                    f"layer {op.layer} is not steered on this server; steered: {list(catalog.layers)}",
                )
            field = "values" if op.values is not None else "base64"
            vector = InlineVector.of(inline_vector(op, path))
            if vector.values.size != catalog.d_model:
                raise SpecError(
                    f"{path}.{field}",
                    f"has {vector.values.size} values; the model's d_model is {catalog.d_model}",
                )
            if not vector.norm > 0:
                raise SpecError(f"{path}.{field}", "is all zeros")
            ops.append(
                ResolvedOp(
                    kind="inline",
                    op="vector",
                    layer=op.layer,
                    coef=coef,
                    positions=_positions(op.positions),
                    when=_condition(op.when, op.layer, catalog, path),
                    inline=vector,
                )
            )
            continue
        if op.name not in catalog.vectors:
            raise SpecError(f"{path}.name", f"unknown vector {op.name!r}; loaded: {sorted(catalog.vectors)}")
        info = catalog.vectors[op.name]
        ops.append(
            ResolvedOp(
                kind="vector",
                op="vector",
                layer=info.layer,
                coef=coef,
                source=op.name,
                positions=_positions(op.positions),
                when=_condition(op.when, info.layer, catalog, path),
                revision=info.revision,
            )
        )
    if len(ops) > catalog.max_ops_per_request:
        raise SpecError(
            f"{prefix}", f"too many operations ({len(ops)}); at most {catalog.max_ops_per_request}"
        )
    per_layer: dict[int, int] = {}
    for op in ops:
        per_layer[op.layer] = per_layer.get(op.layer, 0) + 1
        if per_layer[op.layer] > catalog.max_ops_per_layer:
            raise SpecError(
                f"{prefix}",
                f"too many operations at layer {op.layer}; at most {catalog.max_ops_per_layer} per layer",
            )
    return ops


def check_counts(raw: object, catalog: Catalog, prefix: str = "steering") -> None:
    """The operation counts of a raw `steering` field, checked before any of it is validated or decoded (a body
    with 20,000 inline vectors is refused at once, not after decoding them): the same refusals, statuses and
    fields as resolve_spec and check_policy give for them."""
    if not isinstance(raw, dict):
        return
    features, vectors = raw.get("features"), raw.get("vectors")
    count = sum(len(items) for items in (features, vectors) if isinstance(items, list))
    if count > catalog.max_ops_per_request:
        raise SpecError(prefix, f"too many operations ({count}); at most {catalog.max_ops_per_request}")
    policy = catalog.policy
    if policy is None:
        return
    if policy.max_ops_per_request is not None and count > policy.max_ops_per_request:
        raise SpecError(prefix, f"at most {policy.max_ops_per_request} operations per request here", 403)
    if not isinstance(vectors, list):
        return
    inline = [i for i, v in enumerate(vectors) if isinstance(v, dict) and ("values" in v or "base64" in v)]
    if inline and not policy.allow_inline_vectors:
        raise SpecError(
            f"{prefix}.vectors[{inline[0]}]", "inline vectors are not allowed on this server", 403
        )
    if len(inline) > policy.max_inline_vectors:
        raise SpecError(
            f"{prefix}.vectors",
            f"{len(inline)} inline vectors; at most {policy.max_inline_vectors} per request here",
        )


# --- the operator's policy ---------------------------------------------------------------------------------


def check_policy(
    spec: SteeringSpec, ops: list[ResolvedOp], policy: PolicyConfig, prefix: str = "steering"
) -> None:
    """403 (or 400 for a count) naming the field where `spec` does what `policy` forbids."""
    for i, op in enumerate(o for o in ops if o.kind == "feature"):
        path = f"{prefix}.features[{i}]"
        if (
            policy.allowed_saes is not None
            and op.source not in policy.allowed_saes
            or op.source in policy.denied_saes
        ):
            raise SpecError(path, f"SAE {op.source!r} may not be steered on this server", status=403)
        if any(f.sae == op.source and f.index == op.index for f in policy.denied_features):
            raise SpecError(
                path, f"feature {op.source}/{op.index} may not be steered on this server", status=403
            )
        if policy.allowed_ops is not None and op.op not in policy.allowed_ops:
            raise SpecError(
                f"{path}.op", f"`{op.op}` is not allowed here; allowed: {policy.allowed_ops}", status=403
            )
        if policy.max_abs_value is not None and abs(spec.features[i].value or 0.0) > policy.max_abs_value:
            raise SpecError(
                f"{path}.value", f"|value| above this server's limit {policy.max_abs_value:g}", status=403
            )
    inline = [(i, vec) for i, vec in enumerate(spec.vectors) if vec.inline]
    if inline and not policy.allow_inline_vectors:
        path = f"{prefix}.vectors[{inline[0][0]}]"
        raise SpecError(path, "inline vectors are not allowed on this server", status=403)
    if len(inline) > policy.max_inline_vectors:
        raise SpecError(
            f"{prefix}.vectors",
            f"{len(inline)} inline vectors; at most {policy.max_inline_vectors} per request here",
        )
    inline_ops = [op for op in ops if op.kind == "inline"]  # one per inline vector of the spec, in order
    for (i, vec), op in zip(inline, inline_ops, strict=True):
        if policy.max_inline_norm is None:
            break
        field = "values" if vec.values is not None else "base64"
        path = f"{prefix}.vectors[{i}]"
        # normalised: a fraction of |x|, the vector's own length does not count
        norm = abs(vec.scale) if vec.normalize else op.inline.norm * abs(vec.scale)
        if norm > policy.max_inline_norm:
            raise SpecError(
                f"{path}.{field}",
                f"|scale|·norm is {norm:.4g}, above this server's limit {policy.max_inline_norm:g}",
            )
    for i, vec in enumerate(spec.vectors):
        path = f"{prefix}.vectors[{i}]"
        if not policy.allow_vectors:
            raise SpecError(path, "steering vectors are not allowed on this server", status=403)
        if policy.max_abs_value is not None and abs(vec.scale) > policy.max_abs_value:
            raise SpecError(
                f"{path}.scale", f"|scale| above this server's limit {policy.max_abs_value:g}", status=403
            )
    if policy.max_ops_per_request is not None and len(ops) > policy.max_ops_per_request:
        raise SpecError(
            prefix,
            f"at most {policy.max_ops_per_request} operations per request here",
            status=403,
        )
    if spec.inspect is not None:
        if not policy.allow_inspect:
            raise SpecError(f"{prefix}.inspect", "inspect is not allowed on this server", status=403)
        for i, sae_id in enumerate(spec.inspect.saes or []):
            check_inspectable(policy, sae_id, f"{prefix}.inspect.saes[{i}]")


def check_inspectable(policy: PolicyConfig, sae_id: str, path: str) -> None:
    """403 naming `path` when the operator's policy keeps `sae_id` from being read."""
    if not policy.may_read(sae_id):
        raise SpecError(path, f"SAE {sae_id!r} may not be inspected here", status=403)

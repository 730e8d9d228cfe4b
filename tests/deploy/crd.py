"""Validate a custom resource offline against a CRD schema vendored in tests/deploy/schemas/ (vendor_crd.py).

A CRD's openAPIV3Schema is a structural schema, which is JSON Schema plus Kubernetes' own keywords. It is turned
into a JSON Schema (2020-12) that checks what the API server checks with `kubectl apply` (strict field validation,
kubectl's default since 1.27): unknown fields fail (an object that lists its `properties` takes no others unless
`x-kubernetes-preserve-unknown-fields`), `nullable`, `x-kubernetes-embedded-resource`, list types (`set`: unique
items; `map`: unique `x-kubernetes-list-map-keys`), int32/int64 ranges; plus every JSON Schema keyword the CRD has
(types, enums, required, minimum/maximum, patterns, anyOf for int-or-string). Not checked: CEL rules
(`x-kubernetes-validations`; a schema with any is refused here so that none is skipped silently) and what the
project's admission webhook adds (the tests check those rules of LeaderWorkerSet by hand).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).resolve().parent / "schemas"
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
# The object metadata a manifest sets. The API server validates a resource's own `metadata` as ObjectMeta whatever
# the CRD says (its schema has only `type: object` there); the fields it fills in itself (uid, resourceVersion,
# managedFields...) are left out: a manifest does not set them.
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {
            "type": "string",
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        },
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}
_EMBEDDED = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _OBJECT_META}


def _json_schema(node: dict) -> dict:
    """One node of a structural schema as JSON Schema (recursively)."""
    if "x-kubernetes-validations" in node:
        raise ValueError("CEL rules (x-kubernetes-validations) are not checked here")
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_json_schema(sub) for sub in value]
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-embedded-resource"):
        out["properties"] = {**out.get("properties", {}), **_EMBEDDED}
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # strict: an unknown field is an error, not dropped
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items with the same values of the key fields."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = json.dumps([item.get(k) for k in keys], sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry with {', '.join(keys)} = {key[1:-1]}")
        seen.add(key)


_FORMATS = jsonschema.FormatChecker()
for _name, (_low, _high) in _INT_RANGES.items():
    _FORMATS.checks(_name)(
        lambda value, low=_low, high=_high: not isinstance(value, int) or low <= value <= high
    )

_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@functools.lru_cache
def vendored(name: str) -> dict:
    """A file of tests/deploy/schemas/: its `_source`, group, kind and the schema of each served version."""
    return json.loads((SCHEMAS / name).read_text())


@functools.lru_cache
def _validator(name: str, version: str) -> jsonschema.protocols.Validator:
    schema = _json_schema(vendored(name)["versions"][version])
    schema["properties"]["metadata"] = _OBJECT_META
    _Validator.check_schema(schema)
    return _Validator(schema, format_checker=_FORMATS)


def errors(resource: dict, name: str) -> list[str]:
    """What the API server would refuse in `resource` against the CRD vendored in schemas/NAME: one line per
    error, `kind/name path: message`; [] when it validates."""
    crd = vendored(name)
    group, _, version = resource.get("apiVersion", "").partition("/")
    label = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    if (group, resource.get("kind")) != (crd["group"], crd["kind"]) or version not in crd["versions"]:
        return [
            f"{label}: apiVersion/kind {resource.get('apiVersion')}/{resource.get('kind')} is not {name}'s"
        ]
    found = sorted(
        _validator(name, version).iter_errors(resource), key=lambda e: list(map(str, e.absolute_path))
    )
    return [f"{label} {'.'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in found]

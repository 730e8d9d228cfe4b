"""Vendor the schema of a CustomResourceDefinition for tests/deploy: its openAPIV3Schema, descriptions dropped.

    python tests/deploy/schemas/vendor_crd.py CRD.yaml OUT.json --version VERSION --url URL --commit SHA

CRD.yaml is the project's released CRD file (e.g. LeaderWorkerSet's config/crd/bases/..._leaderworkersets.yaml
at a release tag); OUT.json gets, for each served version, the schema exactly as the CRD has it except every
`description` (documentation only: no validation keyword is dropped), plus where it came from and the sha256 of
the file it was made from, so a copy can be checked against the upstream file. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml


def _without_descriptions(node):
    """The schema without `description` keywords. A property that is itself named `description` (a field of the
    resource) is kept: only the keyword next to `type`/`properties` goes."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "properties":
                out[key] = {name: _without_descriptions(prop) for name, prop in value.items()}
            elif key != "description":
                out[key] = _without_descriptions(value)
        return out
    if isinstance(node, list):
        return [_without_descriptions(item) for item in node]
    return node


def vendored(crd_text: str, *, version: str, url: str, commit: str) -> dict:
    crd = yaml.safe_load(crd_text)
    assert crd["kind"] == "CustomResourceDefinition", crd["kind"]
    spec = crd["spec"]
    return {
        "_source": {
            "crd": crd["metadata"]["name"],
            "release": version,
            "url": url,
            "commit": commit,
            "sha256": hashlib.sha256(crd_text.encode()).hexdigest(),
            "made_by": "tests/deploy/schemas/vendor_crd.py (every `description` keyword dropped, nothing else)",
        },
        "group": spec["group"],
        "kind": spec["names"]["kind"],
        "scope": spec["scope"],
        "versions": {
            v["name"]: _without_descriptions(v["schema"]["openAPIV3Schema"])
            for v in spec["versions"]
            if v.get("served", True)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("crd", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--version", required=True, help="the release the CRD file is from, e.g. v0.10.0")
    parser.add_argument("--url", required=True, help="where the CRD file is published")
    parser.add_argument("--commit", required=True, help="the commit of that release")
    args = parser.parse_args()
    data = vendored(args.crd.read_text(), version=args.version, url=args.url, commit=args.commit)
    args.out.write_text(
        json.dumps(data, separators=(",", ":")) + "\n"
    )  # compact: pretty-print with json.tool


if __name__ == "__main__":
    main()

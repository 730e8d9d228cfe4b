"""The demo SAE's concept feature, as the analysis chose it.

``analyze`` probes the trained SAE for each concept in :data:`.labels.CONCEPTS` and records the latent
that best matches it by measured behaviour (activation mass on the concept's own tokens x how many of
them it fires on) in ``quality.json`` -> ``concepts.<name>.best``. Tests, examples and the demo script
take the feature from there, never from a literal label or index: a rebuilt SAE (other packages, another
corpus) numbers and labels its latents differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

QUALITY_FILE = "quality.json"


class ConceptFeature(NamedTuple):
    index: int
    label: str | None
    record: dict[str, Any]  # the full ``best`` entry (word_precision, word_recall, topic_mass_fraction, ...)


def _quality_path(paths: Any) -> Path:
    if paths is None:
        from .build_assets import asset_paths

        return asset_paths().quality_path
    if hasattr(paths, "quality_path"):  # AssetPaths
        return Path(paths.quality_path)
    p = Path(paths)
    return p / QUALITY_FILE if p.is_dir() else p


def concept_feature(paths: Any = None, name: str = "bridge") -> ConceptFeature:
    """``(index, label, record)`` of the concept feature recorded in ``quality.json``.

    ``paths``: an :class:`~.build_assets.AssetPaths` (from ``ensure_assets()``), the SAE folder, the
    ``quality.json`` path, or None for the default assets dir. Does not build anything.
    """
    qpath = _quality_path(paths)
    with open(qpath, encoding="utf-8") as f:
        quality = json.load(f)
    best = (quality.get("concepts") or {}).get(name, {}).get("best")
    if not best:
        raise LookupError(f"{qpath}: the analysis recorded no feature for concept {name!r}")
    return ConceptFeature(int(best["index"]), best.get("label"), best)


def main(argv: list[str] | None = None) -> int:
    """``python -m steer_demo.concept [--quality PATH] [--name bridge] [--field index|label|json]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Print the demo SAE's recorded concept feature.")
    ap.add_argument(
        "--quality", default=None, help="quality.json or the SAE folder (default: the demo assets)"
    )
    ap.add_argument("--name", default="bridge")
    ap.add_argument("--field", choices=("index", "label", "json"), default="index")
    args = ap.parse_args(argv)
    feat = concept_feature(args.quality, args.name)
    if args.field == "index":
        print(feat.index)
    elif args.field == "label":
        print(feat.label)
    else:
        print(json.dumps(feat.record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

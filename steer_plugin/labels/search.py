"""Feature search: which features' labels and explanations match a query, best match first.

A text matches a query (both compared case-insensitively, runs of white space as one space) as, best first:
`exact` (the whole text), `word` (whole words of the text, e.g. `bridge` in `Golden Gate bridge`), `prefix` (the
start of a word, e.g. `bridg` in `Golden Gate bridges`) or `substring` (anywhere). A feature ranks by the best match
among its label and its explanations; ties go to the feature with the larger known maximum activation (features
with none known after), then the SAE's place in the config, then the index. An empty query matches every feature
that has a label or an explanation, as `substring`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from steer_plugin.labels.neuronpedia import Explanation

MATCH_KINDS = ("exact", "word", "prefix", "substring")


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


def match_rank(needle: str, text: str) -> int | None:
    """Index into MATCH_KINDS of how `needle` matches `text` (both normalized), or None."""
    if needle not in text:
        return None
    if not needle:
        return 3
    if text == needle:
        return 0
    quoted = re.escape(needle)
    if re.search(rf"(?<!\w){quoted}(?!\w)", text):
        return 1
    if re.search(rf"(?<!\w){quoted}", text):
        return 2
    return 3


class Text(NamedTuple):
    normalized: str
    source: str  # "label" (the labels file) or "neuronpedia"
    original: str
    model: str | None = None  # the explainer, for explanations


class Feature(NamedTuple):
    order: int  # the SAE's place in the config
    sae: str
    index: int
    label: str | None
    explanations: tuple[Explanation, ...]
    max_activation: float | None
    texts: tuple[Text, ...]


class Hit(NamedTuple):
    feature: Feature
    rank: int
    matched: Text

    def sort_key(self) -> tuple:
        act = self.feature.max_activation
        return (self.rank, act is None, -(act or 0.0), self.feature.order, self.feature.index)

    def to_json(self) -> dict:
        f, m = self.feature, self.matched
        matched = {"source": m.source, "text": m.original} | (
            {"model": m.model} if m.source != "label" else {}
        )
        return {
            "sae": f.sae,
            "index": f.index,
            "label": f.label,
            "match": MATCH_KINDS[self.rank],
            "exact": self.rank == 0,
            "matched": matched,
            "explanations": [e.to_json() for e in f.explanations],
            "max_activation": f.max_activation,
        }


class SAETexts(NamedTuple):
    """What the search reads of one SAE."""

    id: str
    labels: Mapping[int, str]
    explanations: Mapping[int, tuple[Explanation, ...]]
    max_activations: Mapping[int, float]


class SearchIndex:
    """The features of some SAEs with their normalized texts, built once."""

    def __init__(self, saes: Iterable[SAETexts]):
        self.features: dict[str, list[Feature]] = {}
        for order, sae in enumerate(saes):
            feats = []
            for index in sorted(set(sae.labels) | set(sae.explanations)):
                label = sae.labels.get(index)
                explanations = tuple(sae.explanations.get(index, ()))
                texts = ((Text(normalize(label), "label", label),) if label else ()) + tuple(
                    Text(normalize(e.description), "neuronpedia", e.description, e.model)
                    for e in explanations
                )
                feats.append(
                    Feature(order, sae.id, index, label, explanations, sae.max_activations.get(index), texts)
                )
            self.features[sae.id] = feats

    def search(self, query: str, sae: str | None = None) -> list[Hit]:
        """Every matching feature (of `sae`, or of all), best first."""
        needle = normalize(query)
        hits = []
        for sae_id, feats in self.features.items():
            if sae is not None and sae_id != sae:
                continue
            for feature in feats:
                best = None
                for text in feature.texts:
                    rank = match_rank(needle, text.normalized)
                    if rank is not None and (best is None or rank < best[0]):
                        best = (rank, text)
                if best is not None:
                    hits.append(Hit(feature, *best))
        hits.sort(key=Hit.sort_key)
        return hits

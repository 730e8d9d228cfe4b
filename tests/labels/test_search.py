"""Feature search: match kinds, and the ranking of features against an order written out by hand."""

from __future__ import annotations

import pytest

from steer_plugin.labels.neuronpedia import Explanation
from steer_plugin.labels.search import SAETexts, SearchIndex, match_rank


@pytest.mark.parametrize(
    ("needle", "text", "kind"),
    [
        ("bridge", "bridge", 0),
        ("golden gate", "golden gate", 0),
        ("bridge", "golden gate bridge", 1),
        ("bridge", "bridge / cover", 1),
        ("bridge", "tower (bridge)", 1),
        ("gate bridge", "the golden gate bridge spans", 1),
        ("bridge", "bridges", 2),
        ("bridg", "golden gate bridges", 2),
        ("bridge", "drawbridge", 3),
        ("ridge", "bridge", 3),
        ("bridge", "cabbage", None),
        (".", "serial / .", 1),
        ("", "anything", 3),
    ],
)
def test_match_rank(needle, text, kind):
    assert match_rank(needle, text) == kind


def explained(*descriptions: str, model: str = "gpt-4o-mini") -> tuple[Explanation, ...]:
    return tuple(Explanation(d, model, "oai_token-act-pair") for d in descriptions)


INDEX = SearchIndex(
    [
        SAETexts(
            "a",
            labels={
                1: "Bridge",  # exact, by label, max 10
                2: "bridges",  # prefix
                4: "cabbage",  # no match (its explanation is a substring match)
                5: "Golden Gate bridge",  # word, no max known
                6: "tower",  # no match by label; exact by explanation
                8: "bridgework",  # prefix by label, word by explanation: word
                11: "bridge (ridge)",  # word, max 30
            },
            explanations={
                4: explained("drawbridge mechanics"),
                6: explained("  BRIDGE ", model="claude-3-5-haiku"),  # exact after case and white space
                8: explained("mentions of a bridge"),
                9: explained("references to bridges and tunnels"),  # prefix, no label
                12: explained("sunsets"),  # no match
            },
            max_activations={1: 10.0, 2: 1.0, 4: 7.0, 6: 20.0, 8: 30.0, 9: 1.0, 11: 30.0, 12: 99.0},
        ),
        SAETexts("b", labels={1: "bridge", 3: "bridge"}, explanations={}, max_activations={3: 10.0}),
    ]
)


def test_ranking_order():
    hits = INDEX.search("bridge")
    got = [(h.feature.sae, h.feature.index) for h in hits]
    assert got == [
        ("a", 6),  # exact, max 20
        ("a", 1),  # exact, max 10; SAE a before SAE b at the same max
        ("b", 3),  # exact, max 10
        ("b", 1),  # exact, no max known
        ("a", 8),  # word (by its explanation), max 30; SAE a, index 8 before index 11
        ("a", 11),  # word, max 30
        ("a", 5),  # word, no max known
        ("a", 2),  # prefix, max 1 (by index: 2 before 9)
        ("a", 9),  # prefix, max 1
        ("a", 4),  # substring
    ]
    assert [h.to_json()["match"] for h in hits] == ["exact"] * 4 + ["word"] * 3 + ["prefix"] * 2 + [
        "substring"
    ]


def test_hit_json_names_what_matched_and_every_explanation():
    hits = {(h.feature.sae, h.feature.index): h.to_json() for h in INDEX.search("bridge")}
    assert hits[("a", 6)] == {
        "sae": "a",
        "index": 6,
        "label": "tower",
        "match": "exact",
        "exact": True,
        "matched": {"source": "neuronpedia", "text": "  BRIDGE ", "model": "claude-3-5-haiku"},
        "explanations": [
            {
                "description": "  BRIDGE ",
                "source": "neuronpedia",
                "model": "claude-3-5-haiku",
                "type": "oai_token-act-pair",
            }
        ],
        "max_activation": 20.0,
    }
    assert hits[("a", 1)]["matched"] == {"source": "label", "text": "Bridge"}
    assert hits[("a", 1)]["explanations"] == []
    assert hits[("a", 9)]["label"] is None


def test_search_one_sae_and_the_empty_query():
    assert [h.feature.index for h in INDEX.search("BRIDGE", sae="b")] == [3, 1]
    everything = INDEX.search("  ")
    assert len(everything) == 11  # every feature with a label or an explanation
    assert {h.rank for h in everything} == {3}
    assert (everything[0].feature.sae, everything[0].feature.index) == ("a", 12)  # the largest max activation
    assert INDEX.search("zebra") == []

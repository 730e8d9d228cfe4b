"""The fit endpoints' bodies: bounds, strict types, labels; a 400 naming the JSON path of the bad field."""

from __future__ import annotations

import pytest

from steer_plugin.fitting.bodies import MAX_EXAMPLES, parse_probe_fit, parse_vector_fit, save_name
from steer_plugin.request.schema import SpecError

EXAMPLES = [{"text": f"text {i}", "label": ("yes", "no")[i % 2]} for i in range(6)]
PAIRS = [{"positive": "a", "negative": "b"}]


def probe(**fields) -> dict:
    return {"id": "p", "layer": 3, "examples": EXAMPLES, **fields}


def test_labels_default_to_sorted_and_two_labels_make_one_positive_class():
    task = parse_probe_fit(probe())
    assert task.labels == ("no", "yes") and task.targets == (1, 0, 1, 0, 1, 0)
    task = parse_probe_fit(probe(labels=["yes", "no"]))
    assert task.labels == ("yes", "no") and task.targets == (0, 1, 0, 1, 0, 1)
    assert task.body.pooling == "mean" and task.body.held_out == 0.25


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"layer": "3"}, "layer"),  # strict: no strings for numbers
        ({"layer": True}, "layer"),
        ({"layer": -1}, "layer"),
        ({"held_out": float("nan")}, "held_out"),
        ({"held_out": float("inf")}, "held_out"),
        ({"held_out": 0.9}, "held_out"),
        ({"pooling": "max"}, "pooling"),
        ({"id": "a/b"}, "id"),
        ({"examples": "text"}, "examples"),
        ({"examples": EXAMPLES[:3]}, "examples"),
        ({"examples": [{"text": "a", "label": "x"}] * (MAX_EXAMPLES + 1)}, "examples"),
        ({"examples": [{"text": "a", "label": "x"}] * 6}, "examples"),  # one class only
        ({"examples": [*EXAMPLES[:5], {"text": "a", "label": "third"}]}, "examples"),  # one example of it
        ({"examples": [{"text": "a", "label": 1}] * 4}, "examples[0].label"),
        ({"examples": [{"text": "", "label": "x"}] * 4}, "examples[0].text"),
        ({"examples": [{"text": "a" * 9000, "label": "x"}] * 4}, "examples[0].text"),
        ({"examples": [{"text": "a", "label": "x", "weight": 2}] * 4}, "examples[0].weight"),
        ({"labels": ["yes"]}, "labels"),
        ({"labels": ["yes", "yes"]}, "labels"),
        ({"labels": ["yes", "maybe"]}, "examples[1].label"),
        ({"labels": ["yes", "no", "maybe"]}, "labels"),  # a class without examples
        ({"save_to": "../x"}, "save_to"),
        ({"save_to": "a/b"}, "save_to"),
        ({"save_to": ".."}, "save_to"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_hostile_probe_bodies_name_the_field(fields, param):
    with pytest.raises(SpecError) as err:
        parse_probe_fit(probe(**fields))
    assert (err.value.status, err.value.path) == (400, param)


@pytest.mark.parametrize(
    "body, param",
    [
        ([1], "body"),
        ({"id": "v", "layer": 3, "pairs": []}, "pairs"),
        ({"id": "v", "layer": 3, "pairs": [{"positive": "a"}]}, "pairs[0].negative"),
        ({"id": "v", "layer": 3, "pairs": [{"positive": "a", "negative": 2}]}, "pairs[0].negative"),
        ({"id": "v", "layer": 3, "pairs": PAIRS * (MAX_EXAMPLES + 1)}, "pairs"),
        ({"id": "v", "layer": 3, "pairs": PAIRS, "save_to": "v.pt"}, "save_to"),
        ({"id": "v", "layer": 3.5, "pairs": PAIRS}, "layer"),
    ],
)
def test_hostile_vector_bodies_name_the_field(body, param):
    with pytest.raises(SpecError) as err:
        parse_vector_fit(body)
    assert (err.value.status, err.value.path) == (400, param)


def test_save_names_stay_inside_the_root():
    assert save_name(None, "p") == "p"
    assert save_name(None, "v", ".safetensors") == "v.safetensors"
    assert save_name("mine.safetensors", "v", ".safetensors") == "mine.safetensors"
    for bad in ("", ".", "..", "/abs", "a\\b", "a\0b", ".hidden"):
        with pytest.raises(SpecError):
            save_name(bad, "p")

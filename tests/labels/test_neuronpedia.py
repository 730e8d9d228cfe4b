"""Neuronpedia explanation exports on hand-written files in the layouts Neuronpedia publishes them in: the bulk
export (`explanations/batch-N.jsonl.gz`, one explanation object a line), the export button's JSON array, and the
API's per-feature JSON (`/api/feature/{model}/{source}/{index}`). Broken files are refused naming the key and
the file (and the line or item)."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from steer_plugin.config import ConfigError
from steer_plugin.labels.neuronpedia import Explanation, load_explanations

KEY = "saes[0].explanations (demo)"
NP_ID = "gpt2-small/9-res-jb"
D_SAE = 100


def explanation(index, description, layer="9-res-jb", model="gpt2-small", **extra) -> dict:
    """An explanation object as the bulk export writes it (the index as a string)."""
    return {
        "id": f"clx{index}",
        "modelId": model,
        "layer": layer,
        "index": str(index),
        "description": description,
        "authorId": "clkht01d40000jv08hvalcvly",
        "triggeredByUserId": None,
        "notes": None,
        "scoreV1": 0,
        "scoreV2": None,
        "typeName": "oai_token-act-pair",
        "explanationModelName": "gpt-4o-mini",
        "createdAt": "2024-08-01T12:00:00.000Z",
        **extra,
    }


def feature(index, descriptions, max_act=12.5, layer="9-res-jb") -> dict:
    """A feature as the API's /api/feature answers it."""
    return {
        "modelId": "gpt2-small",
        "layer": layer,
        "index": str(index),
        "sourceSetName": "res-jb",
        "maxActApprox": max_act,
        "frac_nonzero": 0.001,
        "explanations": [
            {
                "id": f"e{index}-{j}",
                "modelId": "gpt2-small",
                "layer": layer,
                "index": str(index),
                "description": d,
                "explanationModelName": model,
                "typeName": "oai_token-act-pair",
                "scores": [],
            }
            for j, (d, model) in enumerate(descriptions)
        ],
        "activations": [{"tokens": ["The", " bridge"], "values": [0.0, 9.1]}],
    }


def write_jsonl_gz(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(i) + "\n" for i in items))
    return path


def load(path, d_sae=D_SAE, neuronpedia_id=NP_ID):
    return load_explanations(path, key=KEY, d_sae=d_sae, neuronpedia_id=neuronpedia_id)


# --- the layouts -----------------------------------------------------------------------------------------------


def test_bulk_export_folder_of_gzipped_batches(tmp_path, caplog):
    folder = tmp_path / "explanations"
    write_jsonl_gz(
        folder / "batch-0.jsonl.gz",
        [
            explanation(3, "references to bridges"),
            explanation(3, "references to bridges"),  # the same again: kept once
            explanation(3, " the word\n 'bridge' ", explanationModelName="claude-3-5-haiku"),
            explanation(7, ""),  # empty: skipped
        ],
    )
    write_jsonl_gz(
        folder / "batch-1.jsonl.gz",
        [explanation(50, "tomato soup"), explanation(250, "for another source", layer="10-res-jb")],
    )
    (folder / "README.txt").write_text("not an export file")
    with caplog.at_level(logging.INFO, logger="steer_plugin"):
        got = load(folder)
    assert got.by_index == {
        3: (
            Explanation("references to bridges", "gpt-4o-mini", "oai_token-act-pair"),
            Explanation("the word 'bridge'", "claude-3-5-haiku", "oai_token-act-pair"),
        ),
        50: (Explanation("tomato soup", "gpt-4o-mini", "oai_token-act-pair"),),
    }
    assert (got.skipped_other_sae, got.skipped_empty, got.count) == (1, 1, 3)
    assert [Path(f).name for f in got.files] == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    assert "skipped 1 for other SAEs, 1 empty" in caplog.text and KEY in caplog.text


def test_export_button_json_array(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([explanation(1, "cities"), {**explanation(2, "rivers"), "index": 2}]))
    got = load(path)
    assert {i: [e.description for e in v] for i, v in got.by_index.items()} == {1: ["cities"], 2: ["rivers"]}
    assert got.max_activations == {}


def test_api_feature_json_one_and_many(tmp_path):
    one = tmp_path / "feature-5.json"
    one.write_text(
        json.dumps(feature(5, [("bridges", "gpt-4o-mini"), ("spans over water", "gpt-4o")]), indent=2)
    )
    got = load(one)
    assert got.by_index[5] == (
        Explanation("bridges", "gpt-4o-mini", "oai_token-act-pair"),
        Explanation("spans over water", "gpt-4o", "oai_token-act-pair"),
    )
    assert got.max_activations == {5: 12.5}
    many = tmp_path / "features.jsonl"
    many.write_text(json.dumps(feature(6, [("soup", None)], max_act=3)) + "\n\n" + json.dumps(feature(8, [])))
    got = load(many)
    assert got.by_index == {6: (Explanation("soup", None, "oai_token-act-pair"),)}
    assert got.max_activations == {6: 3.0, 8: 12.5}
    array = tmp_path / "features.json.gz"
    with gzip.open(array, "wt") as f:
        json.dump([feature(1, [("a", "m")]), feature(2, [("b", "m")])], f)
    assert sorted(load(array).by_index) == [1, 2]


def test_without_neuronpedia_id_a_single_sae_is_taken_whole(tmp_path):
    path = write_jsonl_gz(
        tmp_path / "b.jsonl.gz", [explanation(1, "x", layer="3-res"), explanation(2, "y", layer="3-res")]
    )
    assert sorted(load(path, neuronpedia_id=None).by_index) == [1, 2]
    # Entries that name no model/source at all are taken as this SAE's.
    path = tmp_path / "plain.json"
    path.write_text(json.dumps([{"index": 4, "description": "hand-written"}]))
    assert load(path).by_index[4] == (Explanation("hand-written", None, None),)


# --- broken files ----------------------------------------------------------------------------------------------


def broken_cases(tmp_path: Path):
    """(file, what the error must say besides the key and the file)."""

    def put(name, text):
        p = tmp_path / name
        p.write_text(text)
        return p

    lines = "\n".join(json.dumps(x) for x in (explanation(1, "a"), explanation(2, "b")))
    yield put("bad.json", '[{"index": 1,'), "is not valid JSON"
    yield put("bad.jsonl", lines + "\n{not json}\n"), "line 3 is not valid JSON"
    yield put("notgz.jsonl.gz", lines), "cannot read"
    yield (
        put("idx.json", json.dumps([explanation("abc", "x")])),
        "item [0]: `index` must be a non-negative integer, got 'abc'",
    )
    yield (
        put("neg.json", json.dumps([{**explanation(1, "x"), "index": -1}])),
        "`index` must be a non-negative integer, got -1",
    )
    yield put("sup.json", json.dumps([explanation("²", "x")])), "`index` must be a non-negative integer"
    yield (
        put("bool.json", json.dumps([{**explanation(1, "x"), "index": True}])),
        "`index` must be a non-negative",
    )
    yield (
        put("range.jsonl", lines + "\n" + json.dumps(explanation(100, "x"))),
        "line 3: index 100 is out of range (the SAE has 100 features)",
    )
    yield (
        put("desc.json", json.dumps([{**explanation(1, "x"), "description": 5}])),
        "`description` must be a string, got int",
    )
    yield (
        put("num.json", json.dumps([1, 2])),
        "item [0]: expected a Neuronpedia explanation or feature object, got int",
    )
    yield (
        put("str.json", json.dumps("bridges")),
        "expected a Neuronpedia explanation or feature object, got str",
    )
    yield (
        put("what.json", json.dumps([{"index": 1, "label": "x"}])),
        "neither `description` (an explanation) nor `explanations`",
    )
    yield (
        put("model.json", json.dumps([{**explanation(1, "x"), "modelId": 7}])),
        "`modelId` must be a string, got int",
    )
    yield (
        put("explainer.json", json.dumps([{**explanation(1, "x"), "explanationModelName": ["a"]}])),
        "`explanationModelName` must be a string",
    )
    yield (
        put("fl.json", json.dumps({**feature(1, []), "explanations": "none"})),
        "`explanations` must be a list",
    )
    yield (
        put("fmax.json", json.dumps({**feature(1, []), "maxActApprox": "big"})),
        "`maxActApprox` must be a number",
    )
    inner = feature(1, [("a", "m")])
    inner["explanations"][0]["index"] = "2"
    yield (
        put("inner.json", json.dumps(inner)),
        "explanations[0]: names another feature than its feature object",
    )
    inner = feature(1, [("a", "m")])
    inner["explanations"].append(7)
    yield put("inner7.json", json.dumps(inner)), "explanations[1]: expected an object, got int"
    other = [explanation(1, "a", layer="10-res-jb"), explanation(2, "b", layer="10-res-jb")]
    yield put("other.json", json.dumps(other)), "none of the 2 explanations in"
    yield put("wrongext.csv", "index,description\n1,a\n"), "is not a .json/.jsonl/.json.gz/.jsonl.gz file"
    yield tmp_path / "missing.jsonl", "explanations file not found"


def test_broken_files_are_refused_naming_key_and_file(tmp_path):
    for path, message in broken_cases(tmp_path):
        with pytest.raises(ConfigError) as err:
            load(path)
        text = str(err.value)
        assert text.startswith(KEY + ": "), text
        assert str(path) in text, text
        assert message in text, (path.name, text)


def test_non_utf8_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"[\xff]")
    with pytest.raises(ConfigError, match=r"cannot read .*x\.json"):
        load(path)


def test_several_saes_need_a_neuronpedia_id(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([explanation(1, "a"), explanation(2, "b", layer="10-res-jb")]))
    with pytest.raises(ConfigError, match=r"several SAEs \(gpt2-small/10-res-jb, gpt2-small/9-res-jb\); set"):
        load(path, neuronpedia_id=None)
    # With the id, the other source's entry is skipped and counted.
    got = load(path)
    assert (sorted(got.by_index), got.skipped_other_sae) == ([1], 1)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=re.escape(KEY) + ": no .* file in the folder"):
        load(tmp_path)


def test_out_of_range_entries_of_another_sae_are_skipped_not_refused(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(
        json.dumps(explanation(1, "a")) + "\n" + json.dumps(explanation(5000, "b", layer="10-res-jb"))
    )
    got = load(path)
    assert (sorted(got.by_index), got.skipped_other_sae) == ([1], 1)

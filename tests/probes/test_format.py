"""The probe file format: what save_probe writes load_probe reads back; every bad file is refused naming the
file and the field."""

import json

import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.config import ConfigError
from steer_plugin.probes.format import META_FILE, WEIGHTS_FILE, ProbeMeta, load_probe, read_meta, save_probe

D = 6


def written(tmp_path, **meta) -> tuple:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(2, D, generator=g), torch.randn(2, generator=g)
    folder = save_probe(tmp_path / "p", ProbeMeta(3, ("yes", "no"), **meta), weight, bias)
    return folder, weight, bias


def test_round_trip_and_the_score_formula(tmp_path):
    folder, weight, bias = written(tmp_path, window=4, thresholds={"yes": 0.7})
    probe = load_probe(folder, d_model=D)
    assert probe.meta == ProbeMeta(3, ("yes", "no"), "sigmoid", 4, {"yes": 0.7})
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    # Written out: sigmoid(w_c . x + b_c) per row and class.
    want = [[1 / (1 + torch.exp(-(weight[c] @ x[r] + bias[c]))) for c in range(2)] for r in range(5)]
    assert torch.allclose(probe.score(x), torch.tensor(want), atol=1e-6)
    raw = load_probe(written(tmp_path / "raw", activation="identity")[0])
    assert torch.allclose(raw.score(x), x @ raw.weight.t() + raw.bias, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": "saelens"}, "format"),
        ({"version": 2}, "format"),
        ({"layer": -1}, "layer"),
        ({"layer": "3"}, "layer"),
        ({"labels": []}, "labels"),
        ({"labels": ["a", "a"]}, "labels"),
        ({"labels": ["a", 1]}, "labels"),
        ({"activation": "softmax"}, "activation"),
        ({"window": 0}, "window"),
        ({"window": True}, "window"),
        ({"thresholds": {"maybe": 0.5}}, "thresholds"),
        ({"thresholds": {"yes": float("nan")}}, "thresholds"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_metadata_is_refused_naming_the_field(tmp_path, change, field):
    folder, _, _ = written(tmp_path)
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, **change}))
    with pytest.raises(ConfigError, match=rf"probes\[0\]\.path: .*{META_FILE}: `{field}`"):
        read_meta(folder, "probes[0]")


@pytest.mark.parametrize(
    ("tensors", "why"),
    [
        ({"weight": torch.zeros(3, D), "bias": torch.zeros(3)}, "one row per label"),
        ({"weight": torch.zeros(2, D), "bias": torch.zeros(2, 1)}, "one row per label"),
        ({"weight": torch.zeros(2, D)}, "exactly `weight` and `bias`"),
        ({"weight": torch.full((2, D), float("inf")), "bias": torch.zeros(2)}, "non-finite"),
        ({"weight": torch.zeros(2, D + 1), "bias": torch.zeros(2)}, "d_model"),
    ],
)
def test_bad_weights_are_refused_naming_the_file(tmp_path, tensors, why):
    folder, _, _ = written(tmp_path)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(ConfigError, match=rf"probes\[1\]\.path: .*{WEIGHTS_FILE}.*{why}"):
        load_probe(folder, "probes[1]", d_model=D)


def test_missing_and_broken_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=rf"probes\[0\]\.path: cannot read .*{META_FILE}"):
        read_meta(tmp_path / "nowhere", "probes[0]")
    folder, _, _ = written(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match=rf"cannot load .*{WEIGHTS_FILE}"):
        load_probe(folder, "probes[0]")
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=rf"cannot read .*{META_FILE}"):
        read_meta(folder, "probes[0]")

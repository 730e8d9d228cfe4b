"""Probes in the operator config: loaded by load_assets (weights in workers, probe.json in the API process),
their layers carry the op, and a bad probe or monitoring rule refuses the config naming the key."""

import json

import pytest
import torch

from steer_plugin.catalog import load_assets
from steer_plugin.config import ConfigError, parse_config
from steer_plugin.probes.format import META_FILE, Probe, ProbeMeta, save_probe


def config_with(tmp_path, monitoring: dict | None = None, **meta):
    folder = save_probe(tmp_path / "p", ProbeMeta(4, ("yes", "no"), **meta), torch.ones(2, 8), torch.zeros(2))
    data = {"probes": [{"id": "p", "path": str(folder)}], "monitoring": monitoring or {}}
    return parse_config(data), folder


def test_workers_get_weights_the_api_process_metadata(tmp_path):
    config, _ = config_with(tmp_path)
    worker = load_assets(config, d_model=8)
    assert isinstance(worker.probes["p"], Probe) and worker.layers() == {4}
    api = load_assets(config, weights=False)
    assert api.probes["p"] == ProbeMeta(4, ("yes", "no")) and api.catalog().probes["p"].labels == (
        "yes",
        "no",
    )
    assert load_assets(config, d_model=8, layers=range(0, 4)).probes == {}  # another pipeline stage's layer


def test_bad_probes_and_rules_refuse_the_config(tmp_path):
    with pytest.raises(ConfigError, match="monitoring.probes names unknown probe 'q'"):
        config_with(tmp_path / "a", monitoring={"probes": {"q": {}}})
    config, _ = config_with(tmp_path / "b", monitoring={"probes": {"p": {"label": "maybe", "above": 0.5}}})
    with pytest.raises(ConfigError, match=r"monitoring.probes.p.label: 'maybe' is not a label"):
        load_assets(config, weights=False)
    config, folder = config_with(tmp_path / "c")
    (folder / META_FILE).write_text(json.dumps({**json.loads((folder / META_FILE).read_text()), "layer": -2}))
    with pytest.raises(ConfigError, match=r"probes\[0\]\.path: .*`layer`"):
        load_assets(config, weights=False)
    with pytest.raises(ConfigError, match="d_model 16"):
        load_assets(config_with(tmp_path / "d")[0], d_model=16)
    with pytest.raises(ConfigError, match=r"probes\[1\]\.id 'p' is used twice"):
        parse_config({"probes": [{"id": "p", "path": "x"}, {"id": "p", "path": "y"}]})

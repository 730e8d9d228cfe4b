"""Probes in the operator config: loaded by load_assets (weights in workers, probe.json in the API process),
their layers carry the op, and a bad probe or monitoring rule refuses the config naming the key."""

import json

import pytest
import torch
from safetensors.torch import save_file

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


def test_a_probe_of_sae_features_is_checked_against_its_sae(tmp_path):
    """`sae` in probe.json: the SAE must be loaded, at the probe's layer, and as wide as the weights; the
    API process (probe.json only) checks all but the width; the config is refused naming the probe's key."""
    D, D_SAE, LAYER = 8, 24, 3
    sae_folder = tmp_path / "sae"
    sae_folder.mkdir()
    cfg = {"d_in": D, "d_sae": D_SAE, "dtype": "float32", "architecture": "standard",
           "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post", "sae_lens_version": "6.5.0"}}  # fmt: skip
    (sae_folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"W_enc": torch.ones(D, D_SAE), "W_dec": torch.ones(D_SAE, D), "b_enc": torch.zeros(D_SAE),
               "b_dec": torch.zeros(D)}  # fmt: skip
    save_file(tensors, str(sae_folder / "sae_weights.safetensors"))

    def config(meta: ProbeMeta, width: int, name: str):
        classes = len(meta.labels)
        folder = save_probe(tmp_path / name, meta, torch.ones(classes, width), torch.zeros(classes))
        saes = [{"id": "s", "path": str(sae_folder)}]
        return parse_config({"saes": saes, "probes": [{"id": name, "path": str(folder)}]})

    good = config(ProbeMeta(LAYER, ("on",), sae="s"), D_SAE, "good")
    assert load_assets(good, d_model=D).probes["good"].weight.shape == (1, D_SAE)
    assert load_assets(good, weights=False).probes["good"].sae == "s"
    with pytest.raises(ConfigError, match=r"probes\[0\]\.path: .*`sae` 'nope' is not a loaded SAE"):
        load_assets(config(ProbeMeta(LAYER, ("on",), sae="nope"), D_SAE, "unknown"), weights=False)
    with pytest.raises(ConfigError, match=rf"`layer` {LAYER + 1} is not the layer of SAE 's' \({LAYER}\)"):
        load_assets(config(ProbeMeta(LAYER + 1, ("on",), sae="s"), D_SAE, "elsewhere"), weights=False)
    with pytest.raises(ConfigError, match=rf"`weight` width {D} != SAE 's'.s d_sae {D_SAE}"):
        load_assets(config(ProbeMeta(LAYER, ("on",), sae="s"), D, "narrow"), d_model=D)

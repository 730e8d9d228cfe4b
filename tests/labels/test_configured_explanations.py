"""Explanations configured on an SAE: loaded beside its labels, served by the search, and a broken file refused
at start-up (steer-serve exits before vLLM starts, naming the config entry and the file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.catalog import load_assets
from steer_plugin.config import ConfigError, load_config_file
from steer_plugin.request.schema import SpecError
from steer_plugin.service import SteeringService

D_IN, D_SAE = 8, 32


def write_sae(folder: Path) -> Path:
    """A small SAELens (>= 6) SAE at layer 3 with Neuronpedia id toy/3-res, and a labels.json beside it."""
    folder.mkdir(parents=True)
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "architecture": "standard",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "toy",
            "hook_name": "blocks.3.hook_resid_post",
            "neuronpedia_id": "toy/3-res",
        },
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
        "b_enc": torch.zeros(D_SAE),
        "b_dec": torch.zeros(D_IN),
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    labels = {"features": [{"index": 1, "label": "bridge", "max_act": 5.0}, {"index": 2, "label": "tunnel"}]}
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def write_config(tmp_path: Path, explanations: str | None) -> Path:
    entry = {"id": "toy", "path": "sae"} | ({"explanations": explanations} if explanations else {})
    path = tmp_path / "steer.json"
    path.write_text(json.dumps({"saes": [entry]}))
    return path


def np_line(index: int, description: str, layer: str = "3-res") -> str:
    return json.dumps(
        {
            "modelId": "toy",
            "layer": layer,
            "index": str(index),
            "description": description,
            "explanationModelName": "gpt-4o-mini",
            "typeName": "oai_token-act-pair",
        }
    )


@pytest.fixture
def toy(tmp_path) -> Path:
    write_sae(tmp_path / "sae")
    (tmp_path / "np").mkdir()
    (tmp_path / "np" / "batch-0.jsonl").write_text(
        "\n".join([np_line(2, "bridge"), np_line(7, "bridges over rivers"), np_line(9, "x", layer="4-res")])
    )
    return tmp_path


def test_explanations_load_beside_labels_and_are_searched(toy):
    config = load_config_file(write_config(toy, "np"))  # relative to the config file
    assert config.saes[0].explanations == str(toy / "np")
    loaded = load_assets(config).saes["toy"]
    assert loaded.labels == {1: "bridge", 2: "tunnel"}
    assert {i: [e.description for e in v] for i, v in loaded.explanations.items()} == {
        2: ["bridge"],
        7: ["bridges over rivers"],
    }
    service = SteeringService(config)
    hits = service.discovery.search_features("toy", "bridge")["data"]
    assert [(h["index"], h["match"], h["matched"]["source"]) for h in hits] == [
        (1, "exact", "label"),  # max activation 5 from labels.json
        (2, "exact", "neuronpedia"),  # label `tunnel`, explanation `bridge`; no max known
        (7, "prefix", "neuronpedia"),
    ]
    assert hits[1]["label"] == "tunnel"
    assert hits[1]["explanations"] == [
        {
            "description": "bridge",
            "source": "neuronpedia",
            "model": "gpt-4o-mini",
            "type": "oai_token-act-pair",
        }
    ]
    one = service.discovery.search_features("toy", None, index=7)["data"]
    assert one == [
        {
            "sae": "toy",
            "index": 7,
            "label": None,
            "explanations": [
                {
                    "description": "bridges over rivers",
                    "source": "neuronpedia",
                    "model": "gpt-4o-mini",
                    "type": "oai_token-act-pair",
                }
            ],
            "max_activation": None,
        }
    ]
    assert service.discovery.list_saes()["data"][0]["num_explained"] == 2
    # An explanation is not a steering name: `label` resolves labels only.
    with pytest.raises(SpecError, match="label"):
        service.rewrite_request(
            {"prompt": "x", "steering": {"features": [{"label": "bridges over rivers", "op": "ablate"}]}}
        )
    with pytest.raises(SpecError) as err:
        service.discovery.search_features("toy", None, index=D_SAE)
    assert (err.value.path, err.value.status) == ("index", 404)
    with pytest.raises(SpecError, match="give `sae`"):
        service.discovery.search_features(None, None, index=1)


def test_broken_explanations_refused_naming_entry_and_file(toy):
    bad = toy / "np" / "batch-1.jsonl"
    bad.write_text(np_line(3, "fine") + "\n" + np_line(40, "out of range"))
    with pytest.raises(ConfigError) as err:
        load_assets(load_config_file(write_config(toy, "np")))
    assert str(err.value) == (
        f"saes[0].explanations (toy): {bad} line 2: index 40 is out of range (the SAE has {D_SAE} features)"
    )


def test_steer_serve_refuses_to_start(toy):
    bad = toy / "broken.json"
    bad.write_text('[{"index": "1", "description": "a"}, {"index": "one", "description": "b"}]')
    config = write_config(toy, "broken.json")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "steer_adapters.vllm.api.launcher",
            "--steer-config",
            str(config),
            "--model",
            "unused",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert (
        f"refusing to start: saes[0].explanations (toy): {bad} item [1]: `index` must be a non-negative integer, "
        "got 'one'"
    ) in run.stderr


def test_labels_file_with_a_bad_index_is_refused_naming_it(tmp_path):
    from steer_plugin.catalog import load_labels

    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"features": [{"index": "twelve", "label": "bridge"}]}))
    with pytest.raises(ConfigError, match=f"labels file {path}: feature index 'twelve' is not an integer"):
        load_labels(path)
    path.write_text(json.dumps("bridge"))
    with pytest.raises(ConfigError, match="must hold an object or a list, got str"):
        load_labels(path)

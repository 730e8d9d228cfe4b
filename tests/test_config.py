"""Operator config: errors name the key; relative paths resolve against the file."""

import json

import pytest

from steer_plugin.config import ConfigError, config_from_sources, load_config_file, parse_config


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"saes": [{"id": "a"}]}, "saes.0.path"),
        ({"saes": [{"id": "a b", "path": "x"}]}, "saes.0.id"),
        ({"saes": [{"id": "a", "path": "x", "colour": 1}]}, "saes.0.colour"),
        ({"vectors": [{"id": "v", "path": "x", "layer": -1}]}, "vectors.0.layer"),
        ({"limits": {"max_ops_per_layer": 0}}, "limits.max_ops_per_layer"),
        ({"monitoring": {"saes": {"nope": {}}}}, "monitoring.saes"),
        ({"monitoring": {"sink": "file"}}, "monitoring.path"),
        ({"policy": {"denied_saes": ["nope"]}}, "policy.denied_saes"),
        ({"saes": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]}, "saes[1].id"),
    ],
)
def test_errors_name_the_key(config, key):
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert key in str(err.value)


def test_file_paths_and_sources(tmp_path, monkeypatch):
    path = tmp_path / "steer.json"
    path.write_text(
        json.dumps(
            {
                "saes": [{"id": "a", "path": "sae"}],
                "monitoring": {"sink": "file", "path": "m.jsonl", "saes": {"a": {}}},
            }
        )
    )
    config = load_config_file(path)
    assert config.saes[0].path == str(tmp_path / "sae") and config.monitoring.path == str(
        tmp_path / "m.jsonl"
    )
    assert config_from_sources({"steer_plugin": {"config_path": str(path)}}).saes[0].id == "a"
    monkeypatch.setenv("STEER_PLUGIN_CONFIG", str(path))
    assert config_from_sources(None).fingerprint() == config.fingerprint()
    monkeypatch.delenv("STEER_PLUGIN_CONFIG")
    assert config_from_sources({}) is None
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.json")

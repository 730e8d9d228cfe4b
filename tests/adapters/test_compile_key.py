"""vLLM's compile-cache key follows the plugin config's content, however the config is given."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")


@pytest.fixture
def keyed(monkeypatch):
    from vllm.config import VllmConfig

    from steer_adapters.vllm.worker import install as glue

    glue.patch_compile_cache_key()
    monkeypatch.delenv("STEER_PLUGIN_CONFIG", raising=False)
    return VllmConfig


def write_config(folder, layer: int):
    sae = folder / "sae"
    sae.mkdir(exist_ok=True)
    (sae / "cfg.json").write_text(json.dumps({"hook_name": f"blocks.{layer}.hook_resid_post"}))
    path = folder / "steer.json"
    path.write_text(json.dumps({"saes": [{"id": "s", "path": str(sae)}]}))
    return path


def test_env_only_config_changes_the_key(keyed, tmp_path, monkeypatch):
    plain = keyed().compute_hash()
    path = write_config(tmp_path, 3)
    monkeypatch.setenv("STEER_PLUGIN_CONFIG", str(path))
    with_config = keyed().compute_hash()
    assert with_config != plain and len(with_config) == len(plain)
    write_config(tmp_path, 5)  # the SAE's layer changes under the same config path and text
    assert keyed().compute_hash() not in (plain, with_config)


def test_additional_config_path_is_keyed_on_content(keyed, tmp_path):
    path = write_config(tmp_path, 3)
    extra = {"steer_plugin": {"config_path": str(path)}}
    first = keyed(additional_config=extra).compute_hash()
    assert keyed(additional_config=extra).compute_hash() == first  # stable
    text = json.loads(path.read_text())
    text["limits"] = {"max_ops_per_layer": 4}
    path.write_text(json.dumps(text))
    assert keyed(additional_config=extra).compute_hash() != first

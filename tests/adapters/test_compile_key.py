"""vLLM's compile-cache key follows the content of the steering config a worker loaded, however it was given.

The worker writes the config's fingerprint into `additional_config` (install.key_compile_cache), which vLLM hashes
into its compile-cache key: `VllmConfig.compute_hash()` up to 0.33, `VllmConfig.compile_factors()` from 0.34.
Version-portable: runs on the installed vLLM and in the side venvs of the pinned GPU versions.
"""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("vllm")

from vllm.config import VllmConfig  # noqa: E402

from steer_adapters.vllm.worker.install import COMPILE_KEY, key_compile_cache  # noqa: E402
from steer_plugin.config import load_config_file  # noqa: E402


def compile_key(vllm_config: VllmConfig) -> str:
    """The key vLLM's compile cache uses for this config, as this vLLM computes it."""
    if hasattr(vllm_config, "compute_hash"):  # vLLM <= 0.33
        return vllm_config.compute_hash()
    from vllm.config.utils import hash_factors  # vLLM 0.34: compilation/caching.py hashes compile_factors()

    return hash_factors(vllm_config.compile_factors())


def write_config(folder, layer: int, max_ops: int = 8):
    sae = folder / "sae"
    sae.mkdir(exist_ok=True)
    (sae / "cfg.json").write_text(json.dumps({"hook_name": f"blocks.{layer}.hook_resid_post"}))
    path = folder / "steer.json"
    path.write_text(
        json.dumps({"saes": [{"id": "s", "path": str(sae)}], "limits": {"max_ops_per_layer": max_ops}})
    )
    return path


def keyed(path) -> str:
    vllm_config = VllmConfig()
    key_compile_cache(vllm_config, load_config_file(str(path)))
    return compile_key(vllm_config)


def test_the_key_follows_the_loaded_config(tmp_path):
    plain = compile_key(VllmConfig())
    path = write_config(tmp_path, 3)
    first = keyed(path)
    assert first != plain
    assert keyed(path) == first  # stable
    write_config(tmp_path, 5)  # the SAE's layer changes under the same config path and text
    moved = keyed(path)
    assert moved not in (plain, first)
    write_config(tmp_path, 5, max_ops=4)  # the config's own content
    assert keyed(path) not in (plain, first, moved)


def test_the_operators_additional_config_is_kept(tmp_path):
    vllm_config = VllmConfig(additional_config={"theirs": 1})
    key_compile_cache(vllm_config, load_config_file(str(write_config(tmp_path, 3))))
    assert vllm_config.additional_config["theirs"] == 1 and COMPILE_KEY in vllm_config.additional_config


def test_an_object_additional_config_is_left_alone_with_a_warning(tmp_path, caplog):
    class Theirs:
        def compute_hash(self) -> str:  # vLLM <= 0.33's SupportsHash
            return "theirs"

        def compile_factors(self) -> dict:  # vLLM 0.34's SupportsCompileFactors
            return {"theirs": 1}

    vllm_config = VllmConfig()
    vllm_config.additional_config = Theirs()
    with caplog.at_level(logging.WARNING, logger="steer_plugin"):
        key_compile_cache(vllm_config, load_config_file(str(write_config(tmp_path, 3))))
    assert "compile cache is not keyed" in caplog.text

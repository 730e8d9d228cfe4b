"""`steer-serve-demo` (steer_demo.serve): the demo's config from the built assets, handed to the launcher.

Uses the built assets through a scratch assets folder whose inputs are links to them, so the config file the
command writes lands in the scratch folder, not in the shared assets.
"""

from __future__ import annotations

import json

import pytest

from steer_demo.build_assets import asset_paths
from steer_demo.common import ENV_ASSETS_DIR, MARKER_DIRNAME, MODEL_DIRNAME, SAE_RELDIR, WORK_DIRNAME


@pytest.fixture
def linked_assets(tmp_path, monkeypatch):
    built = asset_paths()
    if not built.quality_path.is_file():
        pytest.skip("demo assets not built (python -m steer_demo.build_assets)")
    root = built.model_dir.parent
    scratch = tmp_path / "assets"
    (scratch / SAE_RELDIR).parent.mkdir(parents=True)
    for rel in (MODEL_DIRNAME, SAE_RELDIR, WORK_DIRNAME, MARKER_DIRNAME):
        (scratch / rel).symlink_to(root / rel)
    monkeypatch.setenv(ENV_ASSETS_DIR, str(scratch))
    return asset_paths(scratch)


def test_demo_config_serves_the_demo_sae(linked_assets):
    from steer_demo.serve import demo_config_path
    from steer_plugin.config import load_config_file

    model_dir, config_path = demo_config_path()
    assert model_dir == str(linked_assets.model_dir)
    assert config_path == str(linked_assets.sae_dir.parent / "demo-steer-config.json")
    raw = json.loads(open(config_path).read())
    assert [s["id"] for s in raw["saes"]] == ["demo"] and raw["policy"]["allow_inline_vectors"] is True
    cfg = json.loads((linked_assets.sae_dir / "cfg.json").read_text())
    assert raw["runtime"]["layers"] == [cfg["metadata"]["hook_layer"]]
    load_config_file(config_path)  # the launcher's own validation accepts it


def test_main_hands_the_launcher_the_demo_config_and_model(linked_assets, monkeypatch):
    import steer_adapters.vllm.api.launcher as launcher
    from steer_demo import serve

    got = []
    monkeypatch.setattr(launcher, "main", got.append)
    serve.main(["--port", "8123"])
    config_path = str(linked_assets.sae_dir.parent / "demo-steer-config.json")
    assert got == [
        ["--steer-config", config_path, "--model", str(linked_assets.model_dir), "--port", "8123",
         "--served-model-name", serve.DEMO_SERVED_NAME]
    ]  # fmt: skip
    got.clear()
    serve.main(["--model=/elsewhere", "--served-model-name", "mine"])  # the caller's own, kept
    assert got == [["--steer-config", config_path, "--model=/elsewhere", "--served-model-name", "mine"]]


def test_launcher_points_the_old_demo_flag_at_the_demo_command(capsys):
    from steer_adapters.vllm.api.launcher import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--port", "8000"])
    assert exit_info.value.code == 2
    assert "steer-serve-demo" in capsys.readouterr().err

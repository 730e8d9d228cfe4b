"""concept_feature() reads the analysis' recorded choice from quality.json (no assets needed)."""

from __future__ import annotations

import json

import pytest

from steer_demo.build_assets import asset_paths
from steer_demo.concept import concept_feature, main

BEST = {"index": 4242, "label": "Bridge / bridge", "word_precision": 0.8, "word_recall": 0.9}


@pytest.fixture
def assets(tmp_path):
    paths = asset_paths(tmp_path)
    paths.sae_dir.mkdir(parents=True)
    paths.quality_path.write_text(
        json.dumps({"concepts": {"bridge": {"best": BEST}, "empty": {"best": None}}})
    )
    return paths


def test_reads_the_recorded_choice_from_any_kind_of_path(assets):
    for where in (assets, assets.sae_dir, assets.quality_path, str(assets.quality_path)):
        feat = concept_feature(where)
        assert (feat.index, feat.label) == (4242, "Bridge / bridge") and feat.record == BEST


def test_default_path_follows_the_assets_env_var(assets, monkeypatch):
    from steer_demo.common import ENV_ASSETS_DIR

    monkeypatch.setenv(ENV_ASSETS_DIR, str(assets.model_dir.parent))
    assert concept_feature().index == 4242


def test_without_the_env_var_the_assets_are_in_the_repository(monkeypatch):
    """<repo>/assets, the repository being the folder of pyproject.toml (the builder's stage markers live there)."""
    from pathlib import Path

    from steer_demo.common import ENV_ASSETS_DIR, default_assets_dir

    monkeypatch.delenv(ENV_ASSETS_DIR, raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "pyproject.toml").is_file()
    assert default_assets_dir() == repo / "assets"


def test_missing_concept_is_a_clear_error(assets):
    for name in ("empty", "nope"):
        with pytest.raises(LookupError, match=name):
            concept_feature(assets, name)


def test_cli(assets, capsys):
    main(["--quality", str(assets.sae_dir), "--field", "index"])
    main(["--quality", str(assets.sae_dir), "--field", "label"])
    assert capsys.readouterr().out.split("\n")[:2] == ["4242", "Bridge / bridge"]


def test_the_concept_feature_is_the_one_whose_mass_lies_in_the_concepts_documents():
    """Two latents fire on every " bridge"; the second also on one other word outside the bridge documents, a
    little less on it than the first does on one inside them, so on precision x recall alone it wins (0.769 >
    0.750); weighed by where the activation lies (topic mass fraction) the first is the concept's feature."""
    import torch

    from steer_demo.labels import concept_probe

    words = {1: " the", 7: " bridge", 2: " other"}
    tokens = torch.tensor([1, 7, 1, 7, 2, 7])
    row_topic = ["bridge"] * 4 + ["other"] * 2
    idx = torch.tensor([[0, 2], [0, 1], [2, 2], [0, 1], [1, 2], [0, 1]])  # [rows, k]: latent 2 never fires
    vals = torch.tensor([[1.0, 0], [1, 1], [0, 0], [1, 1], [0.9, 0], [1, 1]])
    feats = [{"label": f"latent {j}", "density": 0.5} for j in range(3)]
    spec = {"word_tokens": ["bridge"], "words": ["bridge"], "topic": "bridge", "decode": words.__getitem__}
    probe = concept_probe(feats, vals, idx, tokens, row_topic, spec)
    first, second = probe["by_word"]
    assert (first["index"], second["index"]) == (0, 1) and probe["best"] == first
    assert (first["word_precision"], first["word_recall"], first["topic_mass_fraction"]) == (0.75, 1.0, 0.75)
    assert (second["word_precision"], second["word_recall"]) == (round(3 / 3.9, 3), 1.0)
    assert second["topic_mass_fraction"] == round(2 / 3.9, 3)

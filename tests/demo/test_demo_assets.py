"""The built demo SAE reconstructs the demo model's layer-15 residual stream on text it never saw.

The session fixture calls ``ensure_assets()``, which builds the assets when they are missing (a few
minutes on 2 CPU cores), so this works on a fresh machine. The SAE is read from the raw
``cfg.json`` + ``sae_weights.safetensors`` and encoded/decoded with code written here, independent of
the builder and of ``steer_plugin.sae``.
"""

from __future__ import annotations

import json
import math

import pytest

from steer_demo.concept import concept_feature

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# Held-out text: written for this test, not part of the training corpus.
HELD_OUT_PLAIN = [
    "The fog rolled in over the bay early in the morning, and the orange towers of the Golden Gate Bridge "
    "disappeared one after the other while the ferries kept sounding their horns.",
    "To make a quick weeknight dinner, fry some garlic and onions in olive oil, add a tin of chopped tomatoes "
    "and a pinch of salt, simmer for fifteen minutes and serve it over spaghetti.",
    "The goalkeeper dived to his left, but the ball curled into the top corner and the stadium erupted as the "
    "home team took the lead in the final minute of the match.",
    "def moving_average(values, window):\n    total = sum(values[:window])\n    out = [total / window]\n"
    "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n    return out\n",
    "Astronomers pointed the telescope at a distant galaxy and measured how fast its stars were moving, "
    "which told them how much invisible dark matter it must contain.",
    "If the tenant fails to pay the rent for two consecutive months, the landlord may terminate this "
    "agreement by giving thirty days' written notice.",
]
HELD_OUT_CHAT = [
    (
        "Can you suggest a weekend trip from San Francisco?",
        "Sure! You could cross the bridge to Sausalito, "
        "hike in Muir Woods among the redwoods, and come back in the evening for dinner near the waterfront.",
    ),
    (
        "Why does my sourdough not rise?",
        "Your starter may be too weak or the dough too cold. Feed the starter "
        "twice a day and let the dough proof somewhere warm for a few more hours.",
    ),
]

LAYER = 15
EV_MARGIN = 0.10  # allowed drop below the held-out EV that quality.json claims
EV_FLOOR = 0.55  # absolute minimum, whatever quality.json says
OUTLIER_NORM_FACTOR = 4.0  # same rule as the harvest: attention-sink rows are not reconstructed
CONCEPT_WORDS = ("bridge", "bridges")  # the bridge concept's own tokens (labels.CONCEPTS)
CONCEPT_MIN_PRECISION = 0.5  # of the recorded concept feature's activation mass on those tokens (corpus)
CONCEPT_MIN_RECALL = 0.5  # share of those tokens it fires on (corpus)
CONCEPT_MIN_HELD_OUT_MASS = 0.5  # of its activation mass on those tokens in the held-out text


@pytest.fixture(scope="session")
def demo_assets():
    from steer_demo import ensure_assets

    return ensure_assets()


@pytest.fixture(scope="session")
def raw_sae(demo_assets):
    from safetensors.torch import load_file

    cfg = json.loads((demo_assets.sae_dir / "cfg.json").read_text())
    w = load_file(str(demo_assets.sae_dir / "sae_weights.safetensors"))
    return cfg, {k: v.float() for k, v in w.items()}


@pytest.fixture(scope="session")
def quality(demo_assets):
    return json.loads(demo_assets.quality_path.read_text())


@pytest.fixture(scope="session")
def held_out_acts(held_out):
    return held_out[0]


@pytest.fixture(scope="session")
def held_out(demo_assets):
    """Residual stream after decoder layer 15 (= hidden_states[16]) for the held-out texts, fp32, and the
    token (decoded) of every row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_assets.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(demo_assets.model_dir), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30
    texts = list(HELD_OUT_PLAIN)
    for q, a in HELD_OUT_CHAT:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        texts.append(tok.apply_chat_template(msgs, tokenize=False))
    rows, row_tokens = [], []
    with torch.inference_mode():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            assert len(hs) == 31
            rows.append(hs[LAYER + 1][0, 1:])  # position 0 is the attention sink: not reconstructed
            row_tokens += [tok.decode([int(t)]) for t in ids[0, 1:]]
    x = torch.cat(rows).float()
    norms = x.norm(dim=-1)
    keep = norms <= OUTLIER_NORM_FACTOR * norms.median()
    x = x[keep]
    row_tokens = [t for t, k in zip(row_tokens, keep.tolist()) if k]
    assert x.shape[0] > 200 and len(row_tokens) == x.shape[0]
    return x, row_tokens


def topk_encode_decode(x, cfg, w):
    """SAELens >= 6 TopK semantics, written out from the format description."""
    assert cfg["architecture"] == "topk"
    assert cfg["normalize_activations"] == "none"
    assert cfg["rescale_acts_by_decoder_norm"] is False
    d_in, d_sae, k = cfg["d_in"], cfg["d_sae"], cfg["k"]
    assert w["W_enc"].shape == (d_in, d_sae) and w["W_dec"].shape == (d_sae, d_in)
    assert w["b_enc"].shape == (d_sae,) and w["b_dec"].shape == (d_in,)
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    top = torch.topk(pre, k, dim=-1)
    feats = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return feats, feats @ w["W_dec"] + w["b_dec"]


def explained_variance(x, x_hat):
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_cfg_is_saelens_topk(raw_sae):
    cfg, _ = raw_sae
    assert cfg["d_in"] == 576 and cfg["d_sae"] == 4608 and cfg["architecture"] == "topk"
    assert cfg["dtype"] == "float32" and 1 <= cfg["k"] <= 128
    md = cfg["metadata"]
    assert md["hook_name"] == "blocks.15.hook_resid_post"
    assert md["neuronpedia_id"] == "smollm2-135m/15-res-topk"
    assert int(md["sae_lens_version"].split(".")[0]) >= 6  # SAELens reads older versions as the pre-6 format


def test_reconstruction_on_held_out_text(raw_sae, held_out_acts, quality):
    cfg, w = raw_sae
    feats, x_hat = topk_encode_decode(held_out_acts, cfg, w)
    ev = explained_variance(held_out_acts, x_hat)
    l0 = (feats > 0).sum(-1).float()
    claimed = quality["explained_variance"]
    print(f"held-out EV {ev:.4f} (quality.json claims {claimed:.4f}), mean L0 {l0.mean():.1f}")
    assert math.isfinite(ev)
    assert ev >= claimed - EV_MARGIN, f"EV {ev:.4f} on held-out text vs claimed {claimed:.4f}"
    assert ev > EV_FLOOR
    assert int(l0.max()) <= cfg["k"]
    assert quality["l0_mean"] <= cfg["k"]


def test_quality_and_labels(demo_assets, quality, raw_sae):
    cfg, _ = raw_sae
    assert 0.0 <= quality["dead_fraction"] < 0.1
    labels = json.loads(demo_assets.labels_path.read_text())
    feats = labels["features"]
    assert len(feats) == cfg["d_sae"]
    assert [f["index"] for f in feats] == list(range(cfg["d_sae"]))
    live = [f for f in feats if f["label"] is not None]
    assert len(live) > 0.9 * cfg["d_sae"]
    # The concept feature is the analysis' recorded choice (never a literal label or index); labels.json
    # agrees with it, and by the analysis' own measurement it is a feature for the concept's words.
    concept = concept_feature(demo_assets, "bridge")
    assert feats[concept.index]["label"] == concept.label is not None
    assert labels["meta"]["concepts"]["bridge"]["index"] == concept.index
    best = concept.record
    assert best["word_precision"] >= CONCEPT_MIN_PRECISION and best["word_recall"] >= CONCEPT_MIN_RECALL
    # Rebuilds are byte-identical: wall-clock timings live in the build markers, not in the built files.
    from steer_demo.common import TIMING_KEYS

    def keys(obj):
        if isinstance(obj, dict):
            return set(obj) | set().union(*map(keys, obj.values()))
        return set().union(*map(keys, obj)) if isinstance(obj, list) else set()

    assert not keys(quality) & TIMING_KEYS
    from safetensors.torch import load_file

    sp = load_file(str(demo_assets.sae_dir / "sparsity.safetensors"))["sparsity"]
    assert sp.shape == (cfg["d_sae"],) and float(sp.max()) <= 0.0


def test_concept_feature_fires_on_the_concept_in_held_out_text(demo_assets, raw_sae, held_out):
    """Measured on text the SAE never saw: the recorded concept feature fires on every held-out occurrence of
    the concept's word and puts most of its activation there."""
    cfg, w = raw_sae
    x, row_tokens = held_out
    concept = concept_feature(demo_assets, "bridge")
    feats, _ = topk_encode_decode(x, cfg, w)
    act = feats[:, concept.index]
    on_word = torch.tensor([t.strip().lower() in CONCEPT_WORDS for t in row_tokens])
    assert int(on_word.sum()) >= 2
    mass_on_word = float(act[on_word].sum() / act.sum().clamp_min(1e-9))
    print(
        f"concept feature #{concept.index} {concept.label!r}: fires on {int((act[on_word] > 0).sum())}/"
        f"{int(on_word.sum())} held-out concept words, {100 * mass_on_word:.0f}% of its mass there"
    )
    assert bool((act[on_word] > 0).all()), "the concept feature misses a held-out occurrence of its word"
    assert mass_on_word >= CONCEPT_MIN_HELD_OUT_MASS


def test_steer_plugin_loader_matches(demo_assets, raw_sae, held_out_acts):
    try:
        from steer_plugin.sae import load_sae
    except ImportError as e:  # another component; only checked once it exists
        pytest.skip(f"steer_plugin.sae.load_sae not available: {e}")
    cfg, w = raw_sae
    sae = load_sae(str(demo_assets.sae_dir))
    assert sae.architecture == "topk" and sae.k == cfg["k"]
    assert sae.apply_b_dec_to_input is cfg["apply_b_dec_to_input"]
    assert sae.metadata.hook_name == "blocks.15.hook_resid_post"
    assert sae.metadata.neuronpedia_id == "smollm2-135m/15-res-topk"
    assert sae.metadata.layer in (None, LAYER)
    x = held_out_acts[:256]
    ref_feats, ref = topk_encode_decode(x, cfg, w)
    torch.testing.assert_close(sae.encode(x).float(), ref_feats, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sae.reconstruct(x).float(), ref, rtol=1e-4, atol=1e-3)


def test_saelens_reads_it(demo_assets, raw_sae, held_out_acts, saelens_ref):
    """SAELens itself loads the folder as a TopK SAE with the same encode/decode (its SAE classes imported
    without transformer_lens & co., as the SAE format tests do)."""
    cfg, w = raw_sae
    sae = saelens_ref.SAE.load_from_disk(str(demo_assets.sae_dir))
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == cfg["k"]
    assert sae.cfg.metadata.hook_name == "blocks.15.hook_resid_post"
    x = held_out_acts[:256]
    ref_feats, ref = topk_encode_decode(x, cfg, w)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), ref_feats, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(sae.decode(sae.encode(x)), ref, rtol=1e-4, atol=1e-3)


def test_harvest_is_the_same_bytes_on_one_or_two_processes(demo_assets, tmp_path, monkeypatch):
    """The harvest stage forwards on every core; each process computes whole batches with one thread, so the
    activations file must not depend on how many processes ran (checked on a slice of this build's corpus)."""
    from steer_demo.common import sha256_file
    from steer_demo.harvest import ACTS_FILE, build_activations

    lines = (demo_assets.sae_dir.parent.parent / "work" / "corpus.jsonl").read_text().splitlines()[:40]
    digests = []
    for workers in ("1", "2"):
        work = tmp_path / workers
        work.mkdir()
        (work / "corpus.jsonl").write_text("\n".join(lines) + "\n")
        monkeypatch.setenv("STEER_BUILD_WORKERS", workers)
        info = build_activations(demo_assets.model_dir, work)
        assert info["windows"] >= 2 * 16  # more than one batch per process
        digests.append(sha256_file(work / ACTS_FILE))
    assert digests[0] == digests[1]

"""SAEs named by their SAELens release + id or their Neuronpedia source, resolved into a Hugging Face cache.

Every test builds the Hub cache layout itself (`models--org--name/blobs/<sha256>`, `snapshots/<commit>/<path>`
as relative symlinks to the blobs, `refs/main`), points HF_HOME / HF_HUB_CACHE at it, sets HF_HUB_OFFLINE=1 and
forbids sockets: nothing reaches the network. Which repo and folder a name stands for is read here from the
registry file sae-lens ships (yaml's safe loader), and the expected weights are the tensors the test wrote;
neither comes from the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from steer_plugin.catalog import load_sae_source
from steer_plugin.config import ConfigError, parse_config
from steer_plugin.sae import named

from ..tools import skip_or_fail

GEMMA_RELEASE = "gemma-scope-2b-pt-res-canonical"
GEMMA_ID = "layer_20/width_16k/canonical"
JB_RELEASE = "gpt2-small-res-jb"  # SAELens' own format; its registry entry asks for centred inputs
JB_ID = "blocks.8.hook_resid_pre"
D_IN = 8
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- the registry, read independently -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_yaml() -> dict:
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail("sae-lens is not installed (pip install --no-deps sae-lens==6.54.12)")
    file = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    with open(file) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # a safe loader


def entry_of(registry_yaml: dict, release: str, sae_id: str) -> tuple[str, dict]:
    """(repo_id, the SAE's own entry) as the yaml states them."""
    value = registry_yaml[release]
    (sae,) = [s for s in value["saes"] if s["id"] == sae_id]
    return value["repo_id"], sae


# --- a Hub cache built by hand ------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache under tmp, offline, with every socket refused."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: mirror it the way a fresh process would see it
    # (test_env_alone_in_a_fresh_process checks the real environment route).
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network attempt: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    return cache


def cache_repo(
    cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = "main"
) -> Path:
    """Write `files` (path in repo -> content) as huggingface_hub caches them; the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def gemma_scope_params(seed: int, d_sae: int = 16384) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.standard_normal((D_IN, d_sae)).astype(np.float32),
        "W_dec": rng.standard_normal((d_sae, D_IN)).astype(np.float32),
        "b_enc": rng.standard_normal(d_sae).astype(np.float32),
        "b_dec": rng.standard_normal(D_IN).astype(np.float32),
        "threshold": rng.random(d_sae).astype(np.float32),
    }


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def cache_gemma(registry_yaml, cache: Path, commit: str = "a" * 40, seed: int = 0, ref: str | None = "main"):
    """The canonical Gemma Scope SAE in the cache, exactly where the yaml says; (its folder, the tensors)."""
    repo_id, sae = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    params = gemma_scope_params(seed)
    snapshot = cache_repo(cache, repo_id, commit, {f"{sae['path']}/params.npz": npz_bytes(params)}, ref)
    return snapshot / sae["path"], params


def saelens_files(path: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {
        f"{path}/cfg.json": json.dumps(cfg).encode(),
        f"{path}/sae_weights.safetensors": safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}),
    }


def saelens_tensors(seed: int, d_sae: int = 24) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, D_IN, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "b_dec": torch.randn(D_IN, generator=gen),
    }


def config(**sae) -> dict:
    return {"saes": [{"id": "named", **sae}]}


# --- resolving names ----------------------------------------------------------------------------------------


def test_a_release_and_id_load_the_weights_cached_where_the_registry_points(registry_yaml, hub):
    folder, params = cache_gemma(registry_yaml, hub)
    cfg = parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))
    assert Path(cfg.saes[0].local_path) == folder
    loaded = load_sae_source(cfg.saes[0], "saes[0]")
    sae = loaded.sae
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(sae, name), torch.from_numpy(params[name])), name
    assert sae.architecture == "jumprelu"
    assert loaded.layer == 20  # layer_20 in the folder the yaml names
    _, entry = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    assert loaded.neuronpedia_id == entry["neuronpedia"]  # params.npz says nothing: the registry does

    by_path = load_sae_source(parse_config(config(path=str(folder))).saes[0], "saes[0]")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(by_path.sae, name), getattr(sae, name)), name
    assert by_path.layer == loaded.layer


def test_a_neuronpedia_source_names_the_same_sae(registry_yaml, hub):
    folder, params = cache_gemma(registry_yaml, hub)
    _, entry = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    cfg = parse_config(config(neuronpedia=entry["neuronpedia"]))
    assert Path(cfg.saes[0].local_path) == folder
    loaded = load_sae_source(cfg.saes[0], "saes[0]")
    assert torch.equal(loaded.sae.W_dec, torch.from_numpy(params["W_dec"]))
    assert loaded.neuronpedia_id == entry["neuronpedia"]


def test_a_saelens_release_gets_the_registry_settings_its_config_lacks(registry_yaml, hub):
    value = registry_yaml[JB_RELEASE]
    assert value["config_overrides"]["model_from_pretrained_kwargs"]["center_writing_weights"] is True
    repo_id, entry = entry_of(registry_yaml, JB_RELEASE, JB_ID)
    tensors = saelens_tensors(seed=5)
    cfg_json = {
        "d_in": D_IN,
        "d_sae": 24,
        "architecture": "standard",
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": JB_ID},  # no model_from_pretrained_kwargs
    }
    cache_repo(hub, repo_id, "b" * 40, saelens_files(entry["path"], cfg_json, tensors))
    cfg = parse_config(config(neuronpedia=entry["neuronpedia"]))
    loaded = load_sae_source(cfg.saes[0], "saes[0]")
    assert torch.equal(loaded.sae.W_enc, tensors["W_enc"])
    assert loaded.sae.center_input is True
    assert loaded.layer == 7  # blocks.8.hook_resid_pre reads the output of decoder layer 7
    # the operator's own options win over the registry's
    cfg = parse_config(config(release=JB_RELEASE, sae_id=JB_ID, options={"center_input": False}))
    assert load_sae_source(cfg.saes[0], "saes[0]").sae.center_input is False


def test_a_registry_normalisation_override_reaches_the_loader(registry_yaml, hub):
    release, value = next(
        (r, v)
        for r, v in registry_yaml.items()
        if v.get("conversion_func") is None and "normalize_activations" in (v.get("config_overrides") or {})
    )
    sae = value["saes"][0]
    norm = value["config_overrides"]["normalize_activations"]
    cfg_json = {
        "d_in": D_IN,
        "d_sae": 24,
        "architecture": "standard",
        "normalize_activations": "none",  # what the file says; the registry says otherwise
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.8.hook_resid_pre"},
    }
    cache_repo(hub, value["repo_id"], "9" * 40, saelens_files(sae["path"], cfg_json, saelens_tensors(seed=8)))
    loaded = load_sae_source(parse_config(config(release=release, sae_id=sae["id"])).saes[0], "saes[0]")
    assert loaded.sae.per_token_norm == norm


def test_a_registry_entry_that_is_one_file_resolves_to_that_file(registry_yaml, hub):
    release = "goodfire-llama-3.1-8b-instruct"
    (sae,) = registry_yaml[release]["saes"]  # one .pth, as the registry names it
    repo_id = registry_yaml[release]["repo_id"]
    gen = torch.Generator().manual_seed(9)
    state = {
        "encoder_linear.weight": torch.randn(24, D_IN, generator=gen),
        "encoder_linear.bias": torch.randn(24, generator=gen),
        "decoder_linear.weight": torch.randn(D_IN, 24, generator=gen),
        "decoder_linear.bias": torch.randn(D_IN, generator=gen),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    snapshot = cache_repo(hub, repo_id, "f" * 40, {sae["path"]: buf.getvalue()})
    cfg = parse_config(config(neuronpedia=sae["neuronpedia"]))
    assert Path(cfg.saes[0].local_path) == snapshot / sae["path"]
    loaded = load_sae_source(cfg.saes[0], "saes[0]")
    assert torch.equal(loaded.sae.W_enc, state["encoder_linear.weight"].t())
    assert loaded.neuronpedia_id == sae["neuronpedia"]


def test_a_registry_norm_scaling_factor_scales_the_input(registry_yaml, hub):
    (release, sae_id, factor, path, repo_id) = next(
        (r, s["id"], s["norm_scaling_factor"], s["path"], v["repo_id"])
        for r, v in registry_yaml.items()
        if v.get("conversion_func") is None and not v.get("config_overrides")
        for s in v["saes"]
        if "norm_scaling_factor" in s and str(s["id"]).endswith("hook_resid_post")
    )
    cfg_json = {
        "d_in": D_IN,
        "d_sae": 24,
        "architecture": "standard",
        "normalize_activations": "expected_average_only_in",
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": sae_id},
    }
    cache_repo(hub, repo_id, "c" * 40, saelens_files(path, cfg_json, saelens_tensors(seed=6)))
    loaded = load_sae_source(parse_config(config(release=release, sae_id=sae_id)).saes[0], "saes[0]")
    assert loaded.sae.in_scale == pytest.approx(factor)
    assert loaded.sae.out_scale == pytest.approx(1 / factor)


def test_hub_revision_picks_a_cached_commit_and_the_fingerprint_follows_the_files(registry_yaml, hub):
    _, old = cache_gemma(registry_yaml, hub, commit="1" * 40, seed=1, ref=None)
    folder_new, new = cache_gemma(registry_yaml, hub, commit="2" * 40, seed=2)  # refs/main -> 222...
    default = parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))
    pinned = parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID, hub_revision="1" * 40))
    assert Path(default.saes[0].local_path) == folder_new
    assert torch.equal(load_sae_source(default.saes[0], "s").sae.W_enc, torch.from_numpy(new["W_enc"]))
    assert torch.equal(load_sae_source(pinned.saes[0], "s").sae.W_enc, torch.from_numpy(old["W_enc"]))

    before = default.fingerprint()
    repo = hub / "models--google--gemma-scope-2b-pt-res"
    (repo / "refs" / "main").write_text("1" * 40)  # main moves: same config text, other files
    moved = parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))
    assert moved.fingerprint() != before
    assert parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID)).fingerprint() == moved.fingerprint()


def test_a_missing_sae_is_fetched_limited_to_its_folder_when_online(registry_yaml, hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo_id, entry = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    params = gemma_scope_params(seed=7)
    calls = []

    def download(repo, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        """Stands in for the Hub: nothing cached, then the download lands in the cache."""
        calls.append((repo, revision, allow_patterns, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        files = {f"{entry['path']}/params.npz": npz_bytes(params)}
        return str(cache_repo(hub, repo, "e" * 40, files, ref=revision))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    cfg = parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID, hub_revision="v1"))
    patterns = [f"{entry['path']}/*"]
    assert calls == [(repo_id, "v1", patterns, True), (repo_id, "v1", patterns, False)]
    assert torch.equal(load_sae_source(cfg.saes[0], "s").sae.W_enc, torch.from_numpy(params["W_enc"]))


def test_resolution_happens_once_at_config_load(registry_yaml, hub, monkeypatch):
    cache_gemma(registry_yaml, hub)
    cfg = parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))

    def refuse(*args, **kwargs):
        raise AssertionError("resolved again after start-up")

    monkeypatch.setattr(named, "resolve_named", refuse)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert load_sae_source(cfg.saes[0], "saes[0]").layer == 20
    cfg.fingerprint()


# --- errors -------------------------------------------------------------------------------------------------


def test_offline_with_nothing_cached_says_what_to_download(registry_yaml, hub):
    repo_id, entry = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    with pytest.raises(ConfigError) as err:
        parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))
    text = str(err.value)
    assert "saes[0].release (named)" in text
    assert "HF_HUB_OFFLINE" in text and repo_id in text and entry["path"] in text
    with pytest.raises(ConfigError) as err:
        parse_config(config(neuronpedia=entry["neuronpedia"]))
    assert "saes[0].neuronpedia (named)" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_a_cached_repo_without_the_named_folder_is_not_enough(registry_yaml, hub):
    repo_id, _ = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    cache_repo(hub, repo_id, "d" * 40, {"layer_0/width_16k/average_l0_105/params.npz": npz_bytes({})})
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))


@pytest.mark.parametrize(
    "sae, key, wanted",
    [
        ({"release": GEMMA_RELEASE[:-1], "sae_id": GEMMA_ID}, "release", GEMMA_RELEASE),
        ({"release": GEMMA_RELEASE, "sae_id": GEMMA_ID.replace("canonical", "canonicl")}, "sae_id", GEMMA_ID),
        (
            {"neuronpedia": "gemma-2-2b/20-gemmascope-res-16"},
            "neuronpedia",
            "gemma-2-2b/20-gemmascope-res-16k",
        ),
    ],
)
def test_an_unknown_name_is_refused_with_its_key_and_close_matches(registry_yaml, hub, sae, key, wanted):
    _, entry = entry_of(registry_yaml, GEMMA_RELEASE, GEMMA_ID)
    assert wanted in (GEMMA_RELEASE, GEMMA_ID, entry["neuronpedia"])  # the true name, per the yaml
    with pytest.raises(ConfigError) as err:
        parse_config(config(**sae))
    text = str(err.value)
    assert f"saes[0].{key} (named)" in text
    assert "close matches" in text and wanted in text.split("close matches")[1]


def test_a_release_no_loader_of_ours_reads_is_refused_before_any_lookup(registry_yaml, hub):
    release = next(r for r, v in registry_yaml.items() if v.get("conversion_func") == "qwen_scope")
    sae_id = registry_yaml[release]["saes"][0]["id"]
    with pytest.raises(ConfigError) as err:
        parse_config(config(release=release, sae_id=sae_id))
    assert "saes[0].format (named)" in str(err.value) and "qwen_scope" in str(err.value)


def test_without_sae_lens_the_error_says_how_to_install_it(hub, monkeypatch):
    monkeypatch.setattr(named, "SAE_LENS_PACKAGE", "sae_lens_is_not_installed_here")
    with pytest.raises(ConfigError) as err:
        parse_config(config(release=GEMMA_RELEASE, sae_id=GEMMA_ID))
    assert "saes[0].release" in str(err.value)
    assert "pip install --no-deps sae-lens==6.54.12" in str(err.value)


@pytest.mark.parametrize(
    "sae, key, words",
    [
        ({"path": "x", "release": GEMMA_RELEASE, "sae_id": GEMMA_ID}, "release", ["`path` and `release`"]),
        ({"path": "x", "neuronpedia": "gemma-2-2b/20-gemmascope-res-16k"}, "neuronpedia", ["`path` and"]),
        ({}, "path", ["exactly one of `path`, `release` + `sae_id`, `neuronpedia`", "got none"]),
        ({"release": GEMMA_RELEASE}, "sae_id", ["`sae_id` is required with `release`"]),
        ({"sae_id": GEMMA_ID}, "release", ["`release` is required with `sae_id`"]),
        ({"path": "x", "hub_revision": "main"}, "hub_revision", ["not to `path`"]),
        ({"neuronpedia": "gemma-2-2b"}, "neuronpedia", ["pattern"]),
        (
            {"neuronpedia": "gemma-2-2b/20-gemmascope-res-16k", "neuronpedia_id": "gemma-2-2b/other"},
            "neuronpedia_id",
            ["contradicts"],
        ),
    ],
)
def test_naming_mistakes_are_refused_by_the_schema_at_their_key(sae, key, words, monkeypatch):
    monkeypatch.setattr(named, "resolve_named", None)  # never reached
    with pytest.raises(ConfigError) as err:
        parse_config(config(**sae))
    (line,) = [x for x in str(err.value).splitlines() if x.strip().startswith("saes.")]
    assert line.strip().startswith(f"saes.0.{key}: "), line
    for word in words:
        assert word in line


def test_a_path_keeps_working_without_the_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(named, "SAE_LENS_PACKAGE", "sae_lens_is_not_installed_here")
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_9"
    folder.mkdir(parents=True)
    params = gemma_scope_params(seed=3)
    np.savez(folder / "params.npz", **params)
    cfg = parse_config({"saes": [{"id": "p", "path": str(folder)}]})
    assert cfg.saes[0].resolve() is None and cfg.saes[0].local_path == str(folder)
    assert torch.equal(load_sae_source(cfg.saes[0], "saes[0]").sae.W_enc, torch.from_numpy(params["W_enc"]))
    cfg.fingerprint()


def test_env_alone_in_a_fresh_process(registry_yaml, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as an operator sets them, read by huggingface_hub at import."""
    home = tmp_path / "home"
    folder, _ = cache_gemma(registry_yaml, home / "hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    code = (
        "import json, sys; from steer_plugin.config import parse_config; "
        f"c = parse_config({config(release=GEMMA_RELEASE, sae_id=GEMMA_ID)!r}); "
        "print(json.dumps([c.saes[0].local_path, c.fingerprint()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    local, _ = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(local) == folder

"""steer_plugin.catalog: labels files, vectors, configured SAEs with their labels (full or header only), the
catalog request resolution sees, and the API process holding no SAE weights (peak RSS while SteeringService is
built from a 256 MB SAE, measured in a fresh process, per tensor-file kind)."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.catalog import (
    LoadedAssets,
    LoadedSAE,
    LoadedVector,
    load_assets,
    load_labels,
    load_sae_source,
    load_vector,
    load_vector_source,
)
from steer_plugin.config import ConfigError, SAESource, VectorSource, parse_config
from steer_plugin.request.resolve import SAEInfo, VectorInfo
from steer_plugin.sae import SAEHeader, SAEMetadata, SparseAutoencoder
from steer_plugin.service import SteeringService

D, D_SAE, LAYER = 8, 24, 3


def write_sae(
    folder: Path, layer: int = LAYER, hook: str | None = None, labels: object = None, **meta
) -> Path:
    """A SAELens (>= 6) folder reading the residual stream after `layer` (or `hook`), labels.json beside it."""
    folder.mkdir(parents=True)
    cfg = {
        "d_in": D,
        "d_sae": D_SAE,
        "architecture": "standard",
        "metadata": {
            "hook_name": hook or f"blocks.{layer}.hook_resid_post",
            "sae_lens_version": "6.5.0",
            **meta,
        },
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(layer)
    tensors = {
        "W_enc": torch.randn(D, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D, generator=g),
        "b_enc": torch.zeros(D_SAE),
        "b_dec": torch.zeros(D),
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def tensors_in(obj: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from `obj` through tuples, lists, dicts and dataclass fields."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        return []
    return [t for child in children for t in tensors_in(child, seen)]


# --- labels ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, maxima",
    [
        ({"3": "bridge", "7": "tunnel", "9": ""}, {}),
        (
            {"3": {"label": "bridge", "max_act": 4.5}, "7": {"label": "tunnel"}, "9": {"max_act": 2}},
            {3: 4.5, 9: 2.0},
        ),
        ({"features": {"3": "bridge", "7": {"label": "tunnel"}, "9": {"max_act": 2.0}}}, {9: 2.0}),
        (
            {"features": [{"index": 3, "label": "bridge", "max_act": 4.5}, {"index": 7, "label": "tunnel"}]},
            {3: 4.5},
        ),
    ],
)
def test_labels_files(tmp_path, data, maxima):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    assert load_labels(path) == ({3: "bridge", 7: "tunnel"}, maxima)  # an empty label is no label


def test_labels_list_is_indexed_by_position(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["zero", "", {"label": "two", "max_act": 1.5}]))
    assert load_labels(path) == ({0: "zero", 2: "two"}, {2: 1.5})


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "cannot read labels file"),
        ('"a string"', "must hold an object or a list, got str"),
        ('{"x": "bridge"}', "feature index 'x' is not an integer"),
    ],
)
def test_bad_labels_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_labels(path)
    assert str(path) in str(err.value)


# --- vectors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "pt", "pt-dict", "npy", "json", "row"])
def test_vector_files(tmp_path, kind):
    vec = torch.arange(D, dtype=torch.float32) - 2.5
    path = tmp_path / f"v.{kind.split('-')[0]}"
    if kind == "safetensors":
        save_file({"v": vec}, str(path))
    elif kind == "pt":
        torch.save(vec, path)
    elif kind == "pt-dict":
        torch.save({"steer": vec.double()}, path)
    elif kind == "npy":
        np.save(path, vec.numpy())
        path = path.with_suffix(".npy")
    elif kind == "json":
        path.write_text(json.dumps(vec.tolist()))
    else:  # a [1, d] row is taken as the vector
        path = tmp_path / "v.safetensors"
        save_file({"v": vec[None, :].contiguous()}, str(path))
    got = load_vector(VectorSource(id="v", path=str(path), layer=1), "vectors[0]")
    assert got.dtype == torch.float32 and torch.equal(got, vec)


def test_vector_errors_name_the_key_and_file(tmp_path):
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.ones(D), "b": torch.ones(D)}, str(two))
    with pytest.raises(ConfigError, match=r"vectors\[0\]\.tensor: choose one of \['a', 'b'\]"):
        load_vector(VectorSource(id="v", path=str(two), layer=1), "vectors[0]")
    assert load_vector(VectorSource(id="v", path=str(two), layer=1, tensor="b"), "vectors[0]").numel() == D
    matrix = tmp_path / "m.npy"
    np.save(matrix, np.ones((2, D), np.float32))
    with pytest.raises(ConfigError, match=r"must be 1-D, got shape \(2, 8\)"):
        load_vector(VectorSource(id="v", path=str(matrix), layer=1), "vectors[0]")
    bad = tmp_path / "nan.json"
    bad.write_text(json.dumps([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="non-finite"):
        load_vector(VectorSource(id="v", path=str(bad), layer=1), "vectors[0]")
    other = tmp_path / "v.txt"
    other.write_text("1 2 3")
    with pytest.raises(ConfigError, match=r"unsupported vector file type '\.txt'"):
        load_vector(VectorSource(id="v", path=str(other), layer=1), "vectors[0]")
    with pytest.raises(ConfigError, match=rf"length {D} != model d_model 9 \({two}\)"):
        load_vector_source(VectorSource(id="v", path=str(two), layer=1, tensor="a"), "vectors[0]", d_model=9)


# --- SAEs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [True, False])
def test_sae_with_labels_beside_it(tmp_path, weights):
    labels = {"features": [{"index": 1, "label": "bridge", "max_act": 5.0}, {"index": 4, "label": "tunnel"}]}
    folder = write_sae(tmp_path / "sae", labels=labels, neuronpedia_id="toy/3-res")
    loaded = load_sae_source(SAESource(id="s", path=str(folder)), "saes[0]", d_model=D, weights=weights)
    assert (loaded.id, loaded.layer, loaded.neuronpedia_id) == ("s", LAYER, "toy/3-res")
    assert loaded.labels == {1: "bridge", 4: "tunnel"} and loaded.max_activations == {1: 5.0}
    assert (loaded.sae.d_in, loaded.sae.d_sae, loaded.sae.architecture) == (D, D_SAE, "relu")
    assert isinstance(loaded.sae, SparseAutoencoder if weights else SAEHeader)
    assert bool(tensors_in(loaded)) is weights


def test_sae_options_of_the_operator_win(tmp_path):
    folder = write_sae(tmp_path / "sae", neuronpedia_id="toy/3-res")
    other_labels = tmp_path / "mine.json"
    other_labels.write_text(json.dumps({"2": "mine"}))
    source = SAESource(id="s", path=str(folder), labels=str(other_labels), neuronpedia_id="me/x", layer=LAYER)
    loaded = load_sae_source(source, "saes[0]", weights=False)
    assert (loaded.labels, loaded.neuronpedia_id) == ({2: "mine"}, "me/x")


@pytest.mark.parametrize("weights", [True, False])
def test_sae_refusals_name_the_key_and_file(tmp_path, weights):
    folder = write_sae(tmp_path / "sae")
    with pytest.raises(ConfigError, match=rf"saes\[0\] \(s\): SAE d_in {D} != model d_model 16 \({folder}\)"):
        load_sae_source(SAESource(id="s", path=str(folder)), "saes[0]", d_model=16, weights=weights)
    with pytest.raises(ConfigError, match=rf"saes\[1\]\.layer is 5 but the SAE at {folder} reads layer 3"):
        load_sae_source(SAESource(id="s", path=str(folder), layer=5), "saes[1]", weights=weights)
    mlp = write_sae(tmp_path / "mlp", hook="blocks.3.hook_mlp_out")
    with pytest.raises(ConfigError, match=rf"saes\[2\]\.layer: the SAE at {mlp} does not say its layer"):
        load_sae_source(SAESource(id="m", path=str(mlp)), "saes[2]", weights=weights)
    assert load_sae_source(SAESource(id="m", path=str(mlp), layer=3), "saes[2]", weights=weights).layer == 3
    (folder / "cfg.json").write_text("{broken")
    with pytest.raises(ConfigError, match=rf"saes\[0\] \(s\): {folder / 'cfg.json'}: cannot read JSON"):
        load_sae_source(SAESource(id="s", path=str(folder)), "saes[0]", weights=weights)
    with pytest.raises(ConfigError, match=rf"saes\[0\] \(s\): {tmp_path / 'none'}: no such file"):
        load_sae_source(SAESource(id="s", path=str(tmp_path / "none")), "saes[0]", weights=weights)


def test_headers_and_weights_give_the_same_catalog(tmp_path):
    """What the API process resolves against (headers) is what it resolved against when it loaded weights."""
    a = write_sae(tmp_path / "a", labels={"1": "x"}, neuronpedia_id="toy/3-res")
    b = write_sae(tmp_path / "b", layer=5)
    save_file({"v": torch.ones(D)}, str(tmp_path / "v.safetensors"))
    config = parse_config(
        {
            "saes": [{"id": "a", "path": str(a)}, {"id": "b", "path": str(b)}],
            "vectors": [{"id": "v", "path": str(tmp_path / "v.safetensors"), "layer": 7}],
        }
    )
    headers, full = load_assets(config, weights=False), load_assets(config)
    expected = {
        "a": SAEInfo("a", 3, D_SAE, "toy/3-res", {1: "x"}),
        "b": SAEInfo("b", 5, D_SAE, None, {}),
    }
    for assets in (headers, full):
        catalog = assets.catalog(runtime_layers=(9,))
        assert catalog.saes == expected and catalog.vectors == {"v": VectorInfo("v", 7)}
        assert (catalog.d_model, catalog.layers) == (D, (3, 5, 7, 9))
    assert load_assets(config, layers=range(4, 8), weights=False).layers() == {5, 7}


def test_d_model_prefers_the_models():
    header = SAEHeader(D, D_SAE, torch.float32, "relu", None, SAEMetadata())
    assets = LoadedAssets(
        {"s": LoadedSAE("s", header, 2, {}, None)},
        {"v": LoadedVector("v", torch.ones(D), 4)},
        parse_config({}),
    )
    assert assets.d_model() == D and assets.layers() == {2, 4}
    assert assets._replace(model_d_model=64).d_model() == 64
    assert LoadedAssets({}, {}, parse_config({})).d_model() is None


# --- the API process --------------------------------------------------------------------------------------------


def test_the_service_holds_headers_and_describes_them(tmp_path):
    folder = write_sae(tmp_path / "sae", labels={"1": "bridge"}, neuronpedia_id="toy/3-res")
    service = SteeringService(parse_config({"saes": [{"id": "s", "path": str(folder)}]}))
    assert isinstance(service.assets.saes["s"].sae, SAEHeader) and not tensors_in(service.assets.saes)
    assert service.discovery.describe("sae", "s") == {
        "id": "s",
        "layer": LAYER,
        "hook_name": f"blocks.{LAYER}.hook_resid_post",
        "d_in": D,
        "d_sae": D_SAE,
        "architecture": "relu",
        "format": "saelens",
        "neuronpedia_id": "toy/3-res",
        "num_labels": 1,
        "num_explained": 0,
        "revision": None,
    }
    hit = service.discovery.search_features("s", None, index=1)["data"][0]
    assert (hit["label"], hit["index"]) == ("bridge", 1)


def test_the_service_refuses_a_broken_sae_naming_the_file(tmp_path):
    folder = write_sae(tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ConfigError, match=rf"saes\[0\] \(s\): {weights}: cannot read safetensors file"):
        SteeringService(parse_config({"saes": [{"id": "s", "path": str(folder)}]}))


BIG_D, BIG_D_SAE = 1024, 32768  # W_enc + W_dec in float32: 256 MiB


def _write_big(root: Path, kind: str) -> Path:
    """A 256 MiB SAE of zeros: SAELens safetensors (a sparse file written by hand in the safetensors layout:
    u64 header length, JSON header, raw data), Goodfire .pth (torch.save) or Gemma Scope params.npz."""
    if kind == "safetensors":
        folder = root / "big"
        folder.mkdir()
        cfg = {"d_in": BIG_D, "d_sae": BIG_D_SAE, "architecture": "standard"}
        cfg["metadata"] = {"hook_name": "blocks.2.hook_resid_post", "sae_lens_version": "6.0.0"}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        shapes = {
            "W_enc": [BIG_D, BIG_D_SAE],
            "W_dec": [BIG_D_SAE, BIG_D],
            "b_enc": [BIG_D_SAE],
            "b_dec": [BIG_D],
        }
        header, offset = {}, 0
        for name, shape in shapes.items():
            size = 4 * int(np.prod(shape))
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / "sae_weights.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)
        return folder
    if kind == "pth":
        path = root / "Llama-3.1-8B-Instruct-SAE-l2.pth"
        state = {
            "encoder_linear.weight": torch.zeros(BIG_D_SAE, BIG_D),
            "encoder_linear.bias": torch.zeros(BIG_D_SAE),
            "decoder_linear.weight": torch.zeros(BIG_D, BIG_D_SAE),
            "decoder_linear.bias": torch.zeros(BIG_D),
        }
        torch.save(state, path)
        return path
    folder = root / "layer_2" / "width_32k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=np.zeros((BIG_D, BIG_D_SAE), np.float32),
        W_dec=np.zeros((BIG_D_SAE, BIG_D), np.float32),
        b_enc=np.zeros(BIG_D_SAE, np.float32),
        b_dec=np.zeros(BIG_D, np.float32),
        threshold=np.zeros(BIG_D_SAE, np.float32),
    )
    return folder


_PEAK_CHILD = """
import json, sys
from steer_plugin.config import parse_config
from steer_plugin.service import SteeringService

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024

config = parse_config({"saes": [{"id": "big", "path": sys.argv[1]}]})
before = hwm()
service = SteeringService(config)
print(json.dumps({"growth": hwm() - before, "d_sae": service.catalog.saes["big"].d_sae}))
"""


@pytest.mark.parametrize("kind", ["safetensors", "pth", "npz"])
def test_the_api_process_holds_no_sae_weights(tmp_path, kind):
    """Building SteeringService over a 256 MiB SAE raises the process's peak RSS by far less than the weights
    (a full load raises it by at least their size)."""
    path = _write_big(tmp_path, kind)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_CHILD, str(path)], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        sample = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for file in tmp_path.rglob("*"):
            if file.is_file():
                file.unlink()
    weights_bytes = 2 * 4 * BIG_D * BIG_D_SAE
    assert sample["d_sae"] == BIG_D_SAE
    assert sample["growth"] < weights_bytes / 16, f"peak RSS grew {sample['growth'] / 2**20:.0f} MiB"

"""Loading what the operator configured (SAEs, labels, vectors, probes) and describing it for request resolution.

Workers load SAEs in full (`weights=True`); the API process only needs their shapes, ids and labels, so it
reads SAE headers (`weights=False`: configs and tensor-file headers, no weights; steer_plugin.sae
`read_sae_header`) and never holds an SAE's tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from steer_plugin.config import ConfigError, ProbeSource, SAESource, SteerConfig, VectorSource
from steer_plugin.files import (
    MAX_JSON_BYTES,
    MAX_LABELS_BYTES,
    MAX_VECTOR_BYTES,
    FileRefused,
    open_regular,
    read_bounded,
    regular_path,
)
from steer_plugin.labels.neuronpedia import Explanation, load_explanations
from steer_plugin.probes.format import Probe, ProbeInput, ProbeMeta, check_input, load_probe, read_meta
from steer_plugin.request.resolve import ASCII_INDEX, Catalog, SAEInfo, VectorInfo
from steer_plugin.sae.model import SAEHeader, SparseAutoencoder


class LoadedSAE(NamedTuple):
    id: str
    sae: SparseAutoencoder | SAEHeader  # workers: the weights; the API process: the header (weights=False)
    layer: int
    labels: dict[int, str]
    neuronpedia_id: str | None
    max_activations: dict[int, float] = {}  # from the labels file (else the explanations), when recorded
    explanations: dict[int, tuple[Explanation, ...]] = {}  # from `explanations` (Neuronpedia exports)
    revision: str = ""  # loaded at runtime (admin API): that load's revision


class LoadedVector(NamedTuple):
    id: str
    vector: torch.Tensor  # [d_model] float32
    layer: int
    revision: str = ""  # loaded at runtime (admin API): that load's revision


class LoadedProbe(NamedTuple):
    """A probe as the admin API handles it: its file (workers: the weights; the API process: its probe.json) and
    the revision of the runtime load that brought it ("" when configured)."""

    id: str
    probe: Probe | ProbeMeta
    revision: str = ""

    @property
    def layer(self) -> int:
        return probe_meta(self.probe).layer


def load_probe_source(
    source: ProbeSource,
    key: str,
    d_model: int | None = None,
    weights: bool = True,
    saes: Mapping[str, LoadedSAE] = {},
):
    """One probe folder (its probe.json only when `weights` is False), checked, a probe of SAE features against
    its SAE among `saes`; ConfigError naming `key`."""
    probe = load_probe(source.path, key, d_model) if weights else read_meta(source.path, key)
    meta = probe_meta(probe)
    width = probe.weight.shape[1] if isinstance(probe, Probe) else None
    inputs = {sid: ProbeInput(s.layer, s.sae.d_sae) for sid, s in saes.items()}
    check_input(meta, width, inputs, key, source.path)
    return LoadedProbe(source.id, probe)


class LoadedAssets(NamedTuple):
    saes: dict[str, LoadedSAE]
    vectors: dict[str, LoadedVector]
    config: SteerConfig
    model_d_model: int | None = None  # the model's, when known (set once runtime loads may change the rest)
    probes: dict[str, Probe | ProbeMeta] = {}  # workers: the probes; the API process: their probe.json

    def layers(self) -> set[int]:
        """Layers the op runs after: those steered or read by an SAE, a vector or a probe."""
        return (
            {s.layer for s in self.saes.values()}
            | {v.layer for v in self.vectors.values()}
            | {probe_meta(p).layer for p in self.probes.values()}
        )

    def d_model(self) -> int | None:
        if self.model_d_model is not None:
            return self.model_d_model
        widths = [s.sae.d_in for s in self.saes.values()] + [v.vector.numel() for v in self.vectors.values()]
        return widths[0] if widths else None

    def catalog(self, runtime_layers: tuple[int, ...] = ()) -> Catalog:
        """What request resolution needs; `runtime_layers`: layers that steer with nothing configured there
        (reserved for runtime loads), where inline vectors may go too."""
        limits = self.config.limits
        return Catalog(
            saes={
                s.id: SAEInfo(s.id, s.layer, s.sae.d_sae, s.neuronpedia_id, s.labels, s.revision)
                for s in self.saes.values()
            },
            vectors={v.id: VectorInfo(v.id, v.layer, v.revision) for v in self.vectors.values()},
            max_ops_per_request=limits.max_ops_per_request,
            max_ops_per_layer=limits.max_ops_per_layer,
            max_abs_value=limits.max_abs_value,
            d_model=self.d_model(),
            layers=tuple(sorted(self.layers() | set(runtime_layers))),
            policy=self.config.policy,
            probes={pid: probe_meta(p) for pid, p in self.probes.items()},
        )


def load_labels(path: str | os.PathLike) -> tuple[dict[int, str], dict[int, float]]:
    """(index -> label, index -> max activation) from a labels JSON: {"12": "bridge"},
    {"12": {"label": "bridge", "max_act": 47.6, ...}}, {"features": {...}} or a list."""
    try:
        data = json.loads(read_bounded(path, MAX_LABELS_BYTES).decode("utf-8"))
    except FileRefused as err:
        raise ConfigError(f"labels file {err}", status=err.status, field="labels") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read labels file {path}: {err}", field="labels") from None
    if isinstance(data, dict) and "features" in data:
        data = data["features"]
    if not isinstance(data, (list, dict)):
        raise ConfigError(f"labels file {path} must hold an object or a list, got {type(data).__name__}")
    items = enumerate(data) if isinstance(data, list) else data.items()
    labels, maxima = {}, {}
    for key, value in items:
        if isinstance(data, list) and isinstance(value, dict) and "index" in value:
            key = value["index"]  # a list of feature records names each one's index
        # ASCII digits only: int() also reads "٣" as 3 and str.isdigit() accepts "²".
        if isinstance(key, int) and not isinstance(key, bool):
            index = key
        elif isinstance(key, str) and ASCII_INDEX.fullmatch(key):
            index = int(key)
        else:
            raise ConfigError(f"labels file {path}: feature index {key!r} is not an integer", field="labels")
        label = value.get("label") if isinstance(value, dict) else value
        if isinstance(label, str) and label:
            labels[index] = label
        if isinstance(value, dict) and isinstance(value.get("max_act"), (int, float)):
            maxima[index] = float(value["max_act"])
    return labels, maxima


def _sae_layer(source: SAESource, sae: SparseAutoencoder | SAEHeader, key: str) -> int:
    layer = sae.metadata.layer
    if source.layer is not None and layer is not None and source.layer != layer:
        raise ConfigError(
            f"{key}.layer is {source.layer} but the SAE at {source.local_path} reads layer {layer} "
            f"(hook {sae.metadata.hook_name!r})"
        )
    layer = source.layer if source.layer is not None else layer
    if layer is None:
        raise ConfigError(f"{key}.layer: the SAE at {source.local_path} does not say its layer; set `layer`")
    return layer


def load_vector(source: VectorSource, key: str) -> torch.Tensor:
    """The vector a source names, read through steer_plugin.files (a regular file of bounded size, under the
    roots in force)."""
    path = Path(source.path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            with regular_path(path, MAX_VECTOR_BYTES) as opened:
                tensors = load_file(opened)
            name = source.tensor or (next(iter(tensors)) if len(tensors) == 1 else None)
            if name is None or name not in tensors:
                raise ConfigError(f"{key}.tensor: choose one of {sorted(tensors)} in {path}")
            vec = tensors[name]
        elif path.suffix in (".pt", ".pth"):
            with regular_path(path, MAX_VECTOR_BYTES) as opened:
                vec = torch.load(opened, map_location="cpu", weights_only=True)
            if isinstance(vec, dict):
                name = source.tensor or (next(iter(vec)) if len(vec) == 1 else None)
                if name is None or name not in vec:
                    raise ConfigError(f"{key}.tensor: choose one of {sorted(vec)} in {path}")
                vec = vec[name]
        elif path.suffix == ".npy":
            with open_regular(path, MAX_VECTOR_BYTES) as f:
                vec = torch.from_numpy(np.load(f, allow_pickle=False))
        elif path.suffix == ".json":
            vec = torch.tensor(json.loads(read_bounded(path, MAX_JSON_BYTES)), dtype=torch.float32)
        else:
            raise ConfigError(f"{key}.path: unsupported vector file type {path.suffix!r} ({path})")
    except ConfigError:
        raise
    except FileRefused as err:
        raise ConfigError(f"{key}.path: {err}", status=err.status) from None
    except Exception as err:
        raise ConfigError(f"{key}.path: cannot load vector from {path}: {err}") from None
    vec = vec.float().reshape(-1) if vec.dim() == 2 and 1 in vec.shape else vec.float()
    if vec.dim() != 1:
        raise ConfigError(f"{key}.path: vector in {path} must be 1-D, got shape {tuple(vec.shape)}")
    if not torch.isfinite(vec).all():
        raise ConfigError(f"{key}.path: vector in {path} has non-finite values")
    return vec


def load_sae_source(
    source: SAESource,
    key: str,
    d_model: int | None = None,
    explanations: bool = True,
    weights: bool = True,
    labels: bool = True,
) -> LoadedSAE:
    """One configured SAE with its labels (unless `labels` is False: the workers never show them) and
    explanations (unless `explanations` is False); ConfigError naming `key` (e.g. `saes[2]`) and the file
    otherwise. `weights` False: its header only (shapes, dtype, metadata), the files' configs and shapes
    checked but no weights read (so NaNs in them go unnoticed)."""
    from steer_plugin.sae.loading import load_sae, read_sae_header

    try:
        resolved = source.resolve()  # a named SAE: resolved when the config was loaded
    except ValueError as err:
        raise ConfigError(f"{key}.{getattr(err, 'field', 'release')} ({source.id}): {err}") from None
    path = source.local_path
    fmt = source.format or (resolved.format if resolved else None)
    options = {**(resolved.options if resolved else {}), **source.options}  # the operator's own win
    try:
        read = load_sae if weights else read_sae_header
        sae = read(path, fmt, allow_pickle=source.allow_pickle, **options)
    except FileRefused as err:
        raise ConfigError(f"{key} ({source.id}): {err}", status=err.status) from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{key} ({source.id}): {err}") from None
    layer = _sae_layer(source, sae, key)
    if d_model is not None and sae.d_in != d_model:
        raise ConfigError(f"{key} ({source.id}): SAE d_in {sae.d_in} != model d_model {d_model} ({path})")
    labels_path = source.labels or os.path.join(
        path if os.path.isdir(path) else os.path.dirname(path), "labels.json"
    )
    # lexists: a link or a named pipe is there, and load_labels refuses it (exists() would follow the link).
    wanted = labels and os.path.lexists(labels_path)
    labels, maxima = load_labels(labels_path) if wanted else ({}, {})
    neuronpedia_id = (
        source.neuronpedia_id
        or (resolved.neuronpedia_id if resolved else None)
        or sae.metadata.neuronpedia_id
    )
    explained = {}
    if source.explanations and explanations:
        loaded = load_explanations(
            source.explanations,
            key=f"{key}.explanations ({source.id})",
            d_sae=sae.d_sae,
            neuronpedia_id=neuronpedia_id,
        )
        explained = loaded.by_index
        maxima = loaded.max_activations | maxima
    return LoadedSAE(source.id, sae, layer, labels, neuronpedia_id, maxima, explained)


def load_vector_source(source: VectorSource, key: str, d_model: int | None = None) -> LoadedVector:
    vec = load_vector(source, key)
    if d_model is not None and vec.numel() != d_model:
        raise ConfigError(
            f"{key} ({source.id}): length {vec.numel()} != model d_model {d_model} ({source.path})"
        )
    return LoadedVector(source.id, vec, source.layer)


def load_assets(
    config: SteerConfig,
    d_model: int | None = None,
    layers: range | None = None,
    explanations: bool = True,
    weights: bool = True,
) -> LoadedAssets:
    """Load every configured SAE, vector and probe on the CPU (only those on `layers` when given); the SAEs'
    explanation files unless `explanations` is False (workers do not serve them); the SAEs' headers and the
    probes' probe.json only (see load_sae_source) when `weights` is False (the API process)."""
    saes: dict[str, LoadedSAE] = {}
    every_sae: dict[str, LoadedSAE] = {}  # (a probe may read an SAE of a layer this rank does not run)
    for i, source in enumerate(config.saes):
        loaded = every_sae[source.id] = load_sae_source(source, f"saes[{i}]", d_model, explanations, weights)
        if layers is None or loaded.layer in layers:
            saes[source.id] = loaded
    vectors: dict[str, LoadedVector] = {}
    for i, source in enumerate(config.vectors):
        loaded = load_vector_source(source, f"vectors[{i}]", d_model)
        if layers is None or loaded.layer in layers:
            vectors[source.id] = loaded
    probes: dict[str, Probe | ProbeMeta] = {}
    for i, source in enumerate(config.probes):
        key = f"probes[{i}]"
        loaded = load_probe_source(source, key, d_model, weights, every_sae)
        rule = config.monitoring.probes.get(source.id)
        labels = probe_meta(loaded.probe).labels
        if rule is not None and rule.label is not None and rule.label not in labels:
            raise ConfigError(
                f"monitoring.probes.{source.id}.label: {rule.label!r} is not a label of the probe "
                f"{list(labels)} ({source.path})"
            )
        if layers is None or loaded.layer in layers:
            probes[source.id] = loaded.probe
    return LoadedAssets(saes, vectors, config, probes=probes)


def probe_meta(probe: Probe | ProbeMeta) -> ProbeMeta:
    return probe.meta if isinstance(probe, Probe) else probe

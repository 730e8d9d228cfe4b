"""The probe file format: a linear read-out of the residual stream at one layer, `s = act(W·x + b)`.

A probe is a folder of two files:

- `probe.safetensors`: `weight` [C, d_model] and `bias` [C] (float32; C classes, one per label);
- `probe.json`: `{"format": "steer-plugin-probe", "version": 1, "layer": L, "labels": [...C names],
  "activation": "sigmoid" | "identity", "window": W, "thresholds": {label: t}, "sae": id}`. `layer` is the
  decoder layer whose output residual the probe reads (the residual after our steering at that layer); `window`
  is the rolling window (in tokens) of the per-request `window_max` aggregate; `thresholds` are optional,
  reported with the probe. With `sae` (optional) the probe reads that SAE's features instead of the residual,
  `s = act(W·f + b)` with f = the SAE's encode of the residual: `weight` is then [C, d_sae] and `layer` must be
  the SAE's layer (`check_input` holds that rule).

`save_probe` writes it (the fit endpoints and tests), `load_probe` reads it through steer_plugin.files (bounded
regular files) and refuses a bad one with a ConfigError naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from steer_plugin.config import ConfigError
from steer_plugin.files import MAX_JSON_BYTES, MAX_VECTOR_BYTES, FileRefused, read_bounded, regular_path

FORMAT = "steer-plugin-probe"
VERSION = 1
WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"
ACTIVATIONS = ("sigmoid", "identity")
MAX_CLASSES = 64
MAX_WINDOW = 4096


class ProbeMeta(NamedTuple):
    """What probe.json says (the API process needs only this)."""

    layer: int
    labels: tuple[str, ...]  # one per class (row of `weight`)
    activation: str = "sigmoid"
    window: int = 8
    thresholds: dict[str, float] = {}
    sae: str | None = None  # the SAE whose features it reads (weight [C, d_sae]); None: the residual


class ProbeInput(NamedTuple):
    """What an SAE a probe may read offers it (catalog.LoadedSAE gives both)."""

    layer: int
    d_sae: int


def check_input(
    meta: ProbeMeta, width: int | None, saes: Mapping[str, ProbeInput], key: str, where: str | Path
) -> None:
    """A probe on SAE features must name a loaded SAE at its own layer, and (with `width`, the weights' width)
    be as wide as that SAE's dictionary; ConfigError naming `key` and the file otherwise."""
    if meta.sae is None:
        return
    found = saes.get(meta.sae)
    if found is None:
        raise ConfigError(f"{key}.path: {where}: `sae` {meta.sae!r} is not a loaded SAE ({sorted(saes)})")
    if found.layer != meta.layer:
        raise ConfigError(
            f"{key}.path: {where}: `layer` {meta.layer} is not the layer of SAE {meta.sae!r} ({found.layer})"
        )
    if width is not None and width != found.d_sae:
        raise ConfigError(
            f"{key}.path: {where}: `weight` width {width} != SAE {meta.sae!r}'s d_sae {found.d_sae}"
        )


class Probe(NamedTuple):
    meta: ProbeMeta
    weight: torch.Tensor  # [C, d_model] float32
    bias: torch.Tensor  # [C] float32

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, width] (the residual, or the SAE's features) -> scores [n, C]: act(x·Wᵀ + b), in float32."""
        logits = x.float() @ self.weight.t().to(x.device) + self.bias.to(x.device)  # [n, C]
        return torch.sigmoid(logits) if self.meta.activation == "sigmoid" else logits


def save_probe(folder: str | Path, meta: ProbeMeta, weight: torch.Tensor, bias: torch.Tensor) -> Path:
    """Write a probe folder (created if missing); returns it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"weight": weight.detach().float().contiguous(), "bias": bias.detach().float().contiguous()},
        str(folder / WEIGHTS_FILE),
    )
    fields = {k: v for k, v in meta._asdict().items() if not (k == "sae" and v is None)}  # (residual: no key)
    data = {"format": FORMAT, "version": VERSION, **fields, "labels": list(meta.labels)}
    (folder / META_FILE).write_text(json.dumps(data, indent=1))
    return folder


def read_meta(folder: str | Path, key: str = "probe") -> ProbeMeta:
    """probe.json of a probe folder, checked; ConfigError naming the file and field otherwise."""
    path = Path(folder) / META_FILE
    try:
        data = json.loads(read_bounded(path, MAX_JSON_BYTES))
    except FileRefused as err:
        raise ConfigError(f"{key}.path: {err}", status=err.status) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}.path: cannot read {path}: {err}") from None

    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{key}.path: {path}: `{field}` {why}")

    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise bad("format", f"must be {FORMAT!r} with version {VERSION}")
    unknown = set(data) - {"format", "version", *ProbeMeta._fields}
    if unknown:
        raise bad(sorted(unknown)[0], "is not a probe field")
    layer = data.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < 10_000:
        raise bad("layer", "must be a layer index")
    labels = data.get("labels")
    if (
        not isinstance(labels, list)
        or not 1 <= len(labels) <= MAX_CLASSES
        or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise bad("labels", f"must be 1 to {MAX_CLASSES} distinct names")
    activation = data.get("activation", "sigmoid")
    if activation not in ACTIVATIONS:
        raise bad("activation", f"must be one of {list(ACTIVATIONS)}")
    window = data.get("window", 8)
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= MAX_WINDOW:
        raise bad("window", f"must be an integer in 1..{MAX_WINDOW}")
    sae = data.get("sae")
    if sae is not None and not (isinstance(sae, str) and 0 < len(sae) <= 128):
        raise bad("sae", "must be the id of a loaded SAE")
    thresholds = data.get("thresholds", {})
    if not isinstance(thresholds, dict) or not all(
        k in labels and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in thresholds.items()
    ):
        raise bad("thresholds", "must map labels of the probe to finite numbers")
    return ProbeMeta(
        layer, tuple(labels), activation, window, {k: float(v) for k, v in thresholds.items()}, sae
    )


def load_probe(folder: str | Path, key: str = "probe", d_model: int | None = None) -> Probe:
    """A probe folder, checked (shapes against its labels and, for a probe of the residual, `d_model` when
    given; finite weights). A probe of SAE features is checked against its SAE by `check_input`."""
    meta = read_meta(folder, key)
    path = Path(folder) / WEIGHTS_FILE
    try:
        from safetensors.torch import load_file

        with regular_path(path, MAX_VECTOR_BYTES) as opened:
            tensors = load_file(opened)
    except FileRefused as err:
        raise ConfigError(f"{key}.path: {err}", status=err.status) from None
    except Exception as err:
        raise ConfigError(f"{key}.path: cannot load {path}: {err}") from None
    if set(tensors) != {"weight", "bias"}:
        raise ConfigError(f"{key}.path: {path} must hold exactly `weight` and `bias`, has {sorted(tensors)}")
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    classes = len(meta.labels)
    if weight.dim() != 2 or weight.shape[0] != classes or bias.shape != (classes,):
        raise ConfigError(
            f"{key}.path: {path}: `weight` must be [{classes}, d_model] and `bias` [{classes}] "
            f"(one row per label), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if d_model is not None and meta.sae is None and weight.shape[1] != d_model:
        raise ConfigError(f"{key}.path: {path}: `weight` width {weight.shape[1]} != model d_model {d_model}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ConfigError(f"{key}.path: {path} has non-finite weights")
    return Probe(meta, weight, bias)

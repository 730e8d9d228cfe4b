"""Probes for the integration tests, and the check that a server's scores equal the formula written out on
the HF reference's residuals (per token, and the per-request aggregates)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import requests
import torch

from steer_plugin.probes.format import ProbeMeta, save_probe

D_MODEL = 576


class ServerProbe(NamedTuple):
    id: str
    path: str
    layer: int
    labels: tuple[str, ...]
    weight: torch.Tensor  # [C, d]
    bias: torch.Tensor  # [C]
    activation: str
    window: int
    features: Callable[[torch.Tensor], torch.Tensor] | None = None  # a probe of SAE features: their encode

    def formula(self, x: torch.Tensor) -> np.ndarray:
        """x [T, d] -> [T, C]: act(w_c . x_t + b_c) (x_t the SAE's features of the residual for a probe of
        SAE features), written out per class."""
        if self.features is not None:
            x = self.features(x)
        logits = torch.stack(
            [x.double() @ self.weight[c].double() + float(self.bias[c]) for c in range(len(self.labels))], 1
        )
        return (torch.sigmoid(logits) if self.activation == "sigmoid" else logits).numpy()


def topk_sae_encode(sae_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A SAELens TopK SAE's encode written out from its files: the k largest of (x - b_dec)·W_enc + b_enc,
    kept where positive, every other feature 0 (cfg.json: apply_b_dec_to_input, no normalisation)."""
    from safetensors.torch import load_file

    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert (
        cfg["architecture"] == "topk"
        and cfg["apply_b_dec_to_input"]
        and cfg["normalize_activations"] == "none"
    )
    w = {k: v.double() for k, v in load_file(str(sae_dir / "sae_weights.safetensors")).items()}

    def encode(x: torch.Tensor) -> torch.Tensor:
        pre = (x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # [T, d_sae]
        top = pre.topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    return encode


def make_probes(folder: Path, sae_layer: int, sae: tuple[str, Path] | None = None) -> list[ServerProbe]:
    """One sigmoid probe at the SAE's layer, one raw two-class probe at a layer nothing else reads; with `sae`
    (its id and folder), a third of that SAE's features."""
    g = torch.Generator().manual_seed(11)
    made = []
    for pid, layer, labels, activation, window in (
        ("concept", sae_layer, ("on",), "sigmoid", 3),
        ("early", 4, ("left", "right"), "identity", 8),
    ):
        # Small weights: the residual's norm is ~10-100, so sigmoid stays off its flat ends.
        weight = torch.randn(len(labels), D_MODEL, generator=g) * 0.02
        bias = torch.randn(len(labels), generator=g) * 0.1
        path = save_probe(folder / pid, ProbeMeta(layer, labels, activation, window), weight, bias)
        made.append(ServerProbe(pid, str(path), layer, labels, weight, bias, activation, window))
    if sae is not None:
        sae_id, sae_dir = sae
        encode = topk_sae_encode(Path(sae_dir))
        d_sae = json.loads((Path(sae_dir) / "cfg.json").read_text())["d_sae"]
        weight, bias = torch.randn(1, d_sae, generator=g) * 0.05, torch.zeros(1)  # (activations ~1-30)
        meta = ProbeMeta(sae_layer, ("on",), "sigmoid", 3, sae=sae_id)
        path = save_probe(folder / "features", meta, weight, bias)
        made.append(
            ServerProbe("features", str(path), sae_layer, ("on",), weight, bias, "sigmoid", 3, encode)
        )
    return made


def config_entries(probes: list[ServerProbe]) -> list[dict]:
    return [{"id": p.id, "path": p.path} for p in probes]


def check_chat_probe_scores(
    base: str, hf, probes: list[ServerProbe], messages: list[dict], headers: dict | None = None
):
    """A chat with inspect.probes: every generated token's scores and the summary equal the formula on the
    reference's residuals (the residual at position P-1+k predicts generated token k)."""
    body = {
        "model": "demo", "messages": messages, "max_tokens": 6, "temperature": 0,
        "return_token_ids": True, "steering": {"inspect": {"saes": [], "probes": [p.id for p in probes]}},
    }  # fmt: skip
    reply = requests.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=300)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    prompt_ids, generated = reply.json()["prompt_token_ids"], choice["token_ids"]
    steering = choice["steering"]
    assert "tokens" in steering and all(t == {} for t in steering["tokens"])  # saes: []: no features
    assert len(steering["probes"]) == len(generated)
    ids = prompt_ids + generated
    first = len(prompt_ids) - 1
    for p in probes:
        x = hf.residual_after(p.layer, ids)[first : first + len(generated)]  # [N, d]
        want = p.formula(x)  # [N, C]
        got = np.array([[token[p.id][label] for label in p.labels] for token in steering["probes"]])
        assert np.allclose(got, want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max()))), (
            p.id,
            got,
            want,
        )
        for c, label in enumerate(p.labels):
            summary = steering["probe_summary"][p.id][label]
            w = min(p.window, len(generated))
            windows = [want[i : i + w, c].mean() for i in range(len(generated) - w + 1)]
            expected = {"max": want[:, c].max(), "mean": want[:, c].mean(), "window_max": max(windows)}
            for key, value in expected.items():
                assert abs(summary[key] - value) <= 1e-3 * max(1.0, abs(value)), (p.id, label, key, summary)
            assert summary["tokens"] == len(generated)
    return steering

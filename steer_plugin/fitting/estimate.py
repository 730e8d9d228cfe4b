"""The numbers of a fit: pooling a text's residual rows, the logistic-regression probe and its held-out
scores, the difference-of-means steering vector.

A probe is fitted on pooled residuals (one row per text) and scored per token at serving time as
act(W·x + b) on the raw residual (steer_plugin/probes/format.py): the features are standardised for the fit
(scikit-learn's LogisticRegression, L2, C = 1) and the scaling is folded back into W and b, so the saved
probe reads the raw residual. Held-out AUROC and accuracy are computed from the saved W and b on the raw
pooled residuals of the held-out texts (a stratified split, fixed seed).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from steer_plugin.request.schema import SpecError

SEED = 0
REGULARISATION_C = 1.0


def pool(rows: np.ndarray, pooling: str, sink_positions: int) -> np.ndarray:
    """rows [T, d], the residual at positions 0..T-1 of one text -> [d]: `last` its last row; `mean` the mean
    of its rows, attention-sink positions (< sink_positions) left out when the text has more than those."""
    if pooling == "last":
        return rows[-1].astype(np.float64)
    kept = rows[sink_positions:] if len(rows) > sink_positions else rows
    return kept.astype(np.float64).mean(0)


class ProbeFit(NamedTuple):
    weight: np.ndarray  # [C, d] float32: the probe on the raw residual
    bias: np.ndarray  # [C] float32
    auroc: float | None  # held out: the binary AUROC, or the mean over labels (one-vs-rest); None: undefined
    auroc_by_label: dict[str, float | None]
    accuracy: float
    train: tuple[int, ...]  # example indices
    held_out: tuple[int, ...]


def split(targets: np.ndarray, classes: int, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) example indices, stratified by class, each side holding every class when it can."""
    from sklearn.model_selection import train_test_split

    n = len(targets)
    n_test = min(n - classes, max(classes, math.ceil(held_out * n)))
    train, test = train_test_split(np.arange(n), test_size=n_test, stratify=targets, random_state=SEED)
    return np.sort(train), np.sort(test)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_probe(x: np.ndarray, targets: np.ndarray, labels: tuple[str, ...], held_out: float) -> ProbeFit:
    """x [n, d] pooled residuals, targets [n] class indices into `labels`. Two labels: one sigmoid class (the
    second label, the positive one); more: one sigmoid class per label, one-vs-rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    if not np.isfinite(x).all():
        raise SpecError("examples", "a text's residual is not finite: nothing can be fitted")
    train, test = split(targets, len(labels), held_out)
    mean = x[train].mean(0)
    std = np.maximum(x[train].std(0), 1e-6)
    z = (x - mean) / std
    heads = [1] if len(labels) == 2 else list(range(len(labels)))
    weights, biases = [], []
    for c in heads:
        model = LogisticRegression(C=REGULARISATION_C, max_iter=5000)
        model.fit(z[train], (targets[train] == c).astype(int))
        w = model.coef_[0] / std  # folded back: w·(x - mean)/std + b0 = (w/std)·x + (b0 - (w/std)·mean)
        weights.append(w)
        biases.append(model.intercept_[0] - w @ mean)
    weight, bias = np.array(weights), np.array(biases)
    scores = _sigmoid(x[test] @ weight.T + bias)  # [n_test, heads], from the saved form
    by_label: dict[str, float | None] = {}
    for j, c in enumerate(heads):
        truth = targets[test] == c
        by_label[labels[c]] = (
            float(roc_auc_score(truth, scores[:, j])) if 0 < truth.sum() < len(truth) else None
        )
    if len(heads) == 1:
        accuracy = float(((scores[:, 0] > 0.5) == (targets[test] == 1)).mean())
    else:
        accuracy = float((scores.argmax(1) == targets[test]).mean())
    defined = [v for v in by_label.values() if v is not None]
    auroc = float(np.mean(defined)) if defined else None
    return ProbeFit(
        weight.astype(np.float32),
        bias.astype(np.float32),
        auroc,
        by_label,
        accuracy,
        tuple(int(i) for i in train),
        tuple(int(i) for i in test),
    )


class VectorFit(NamedTuple):
    vector: np.ndarray  # [d] float32, unit norm
    norm: float  # |mean(positive) - mean(negative)| before normalising


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> VectorFit:
    """positive, negative [n, d] pooled residuals of the pairs -> (mean(positive) - mean(negative)) / its norm
    (contrastive activation addition)."""
    diff = positive.astype(np.float64).mean(0) - negative.astype(np.float64).mean(0)
    norm = float(np.linalg.norm(diff))
    scale = max(1.0, float(np.linalg.norm(positive.astype(np.float64).mean(0))))
    if not math.isfinite(norm) or norm <= 1e-9 * scale:
        raise SpecError(
            "pairs", "the positive and negative texts read the same residual: there is no direction"
        )
    return VectorFit((diff / norm).astype(np.float32), norm)

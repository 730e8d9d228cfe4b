"""The numbers of a fit, against formulas written out: pooling, the difference of means, the probe's folded
weights (its scores on the raw residual equal the standardised model's) and its held-out AUROC and accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from steer_plugin.fitting.estimate import fit_probe, mean_difference, pool, split
from steer_plugin.request.schema import SpecError


def test_mean_pooling_leaves_the_sink_positions_out_and_last_takes_the_last_row():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)  # positions 0..3
    assert np.allclose(pool(rows, "mean", 1), (rows[1] + rows[2] + rows[3]) / 3)
    assert np.allclose(pool(rows, "mean", 0), rows.sum(0) / 4)
    assert np.allclose(pool(rows[:1], "mean", 1), rows[0])  # nothing but sinks: kept
    assert np.allclose(pool(rows, "last", 1), rows[3])


def test_the_vector_is_the_unit_difference_of_the_means():
    g = np.random.default_rng(0)
    pos, neg = g.normal(size=(5, 8)) + 2.0, g.normal(size=(5, 8))
    fit = mean_difference(pos, neg)
    diff = [sum(pos[i][j] for i in range(5)) / 5 - sum(neg[i][j] for i in range(5)) / 5 for j in range(8)]
    norm = sum(d * d for d in diff) ** 0.5
    assert np.allclose(fit.vector, np.array(diff) / norm, atol=1e-6) and abs(fit.norm - norm) < 1e-9
    with pytest.raises(SpecError) as err:
        mean_difference(pos, pos)
    assert err.value.path == "pairs"


def written_auroc(truth, scores) -> float:
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_a_binary_probe_separates_and_reports_held_out_figures_from_its_saved_form():
    g = np.random.default_rng(1)
    d, n = 32, 80
    direction = g.normal(size=d)
    targets = np.array([i % 2 for i in range(n)])
    x = g.normal(size=(n, d)) * 3.0 + 50.0 + np.outer(targets * 2 - 1, direction) * 1.5  # offset: not centred
    fit = fit_probe(x, targets, ("neg", "pos"), 0.25)
    assert fit.weight.shape == (1, d) and fit.bias.shape == (1,)
    assert len(fit.held_out) == 20 and sorted(fit.train + fit.held_out) == list(range(n))
    held = list(fit.held_out)
    assert sorted(targets[held].tolist()) == [0] * 10 + [1] * 10  # stratified
    scores = [1 / (1 + np.exp(-(float(fit.weight[0] @ x[i]) + float(fit.bias[0])))) for i in held]
    assert abs(fit.auroc - written_auroc(targets[held] == 1, scores)) < 1e-9
    assert fit.auroc > 0.9 and fit.auroc_by_label == {"pos": fit.auroc}
    assert abs(fit.accuracy - np.mean([(s > 0.5) == (targets[i] == 1) for s, i in zip(scores, held)])) < 1e-9


def test_the_folded_probe_equals_the_standardised_model():
    from sklearn.linear_model import LogisticRegression

    g = np.random.default_rng(2)
    x = g.normal(size=(40, 6)) * np.array([1, 10, 100, 0.1, 1, 5]) + 7.0
    targets = (x[:, 0] + x[:, 1] / 10 > 7.5).astype(int)
    fit = fit_probe(x, targets, ("a", "b"), 0.25)
    train = list(fit.train)
    mean, std = x[train].mean(0), x[train].std(0)
    model = LogisticRegression(C=1.0, max_iter=5000).fit((x[train] - mean) / std, targets[train])
    want = model.predict_proba((x - mean) / std)[:, 1]
    got = 1 / (1 + np.exp(-(x @ fit.weight[0].astype(np.float64) + fit.bias[0])))
    assert np.allclose(got, want, atol=1e-4)


def test_more_labels_fit_one_sigmoid_class_each():
    g = np.random.default_rng(3)
    centres = g.normal(size=(3, 16)) * 4
    targets = np.array([i % 3 for i in range(60)])
    x = centres[targets] + g.normal(size=(60, 16))
    fit = fit_probe(x, targets, ("a", "b", "c"), 0.25)
    assert fit.weight.shape == (3, 16) and set(fit.auroc_by_label) == {"a", "b", "c"}
    assert fit.accuracy > 0.8 and fit.auroc > 0.9


def test_the_split_keeps_every_class_on_both_sides_and_refuses_nothing_finite():
    targets = np.array([0, 0, 1, 1])
    train, test = split(targets, 2, 0.25)
    assert sorted(targets[train].tolist()) == [0, 1] and sorted(targets[test].tolist()) == [0, 1]
    with pytest.raises(SpecError) as err:
        fit_probe(np.array([[np.nan, 1.0]] * 4), targets, ("a", "b"), 0.25)
    assert err.value.path == "examples"

"""Per-request probe aggregates against the definitions written out."""

import numpy as np

from steer_plugin.probes.aggregate import aggregate


def test_max_mean_and_window_max():
    scores = [0.1, 0.9, 0.2, 0.6, 0.7, 0.8, 0.1]
    got = aggregate(scores, window=3)
    # Windows of 3: means 0.4, 0.5667, 0.5, 0.7, 0.5333 -> the highest is (0.6 + 0.7 + 0.8) / 3.
    assert got.max == 0.9 and got.tokens == 7
    assert np.isclose(got.mean, sum(scores) / 7)
    assert np.isclose(got.window_max, (0.6 + 0.7 + 0.8) / 3)
    assert got.window_max < got.max  # one spiking token does not carry the window


def test_short_answers_and_empty():
    assert np.isclose(aggregate([0.2, 0.4], window=8).window_max, 0.3)  # fewer tokens than the window
    assert aggregate([0.5], window=1) == (0.5, 0.5, 0.5, 1)
    assert aggregate([], window=4) is None

"""Per-request aggregates of a probe's per-token scores (the API process computes them from the records).

Attention-sink positions are left out before aggregating (their residual carries no meaning). For one class:
- `max`: the highest score of any token;
- `mean`: the mean score;
- `window_max`: the highest mean over `window` consecutive tokens (MultiMax-style: a single spiking token
  does not carry it, a sustained passage anywhere in a long answer does); over fewer tokens than the window,
  the mean of all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Aggregate(NamedTuple):
    max: float
    mean: float
    window_max: float
    tokens: int  # scored tokens (sinks left out)


def aggregate(scores: np.ndarray, window: int) -> Aggregate | None:
    """scores [T] -> its aggregates (None when T = 0)."""
    scores = np.asarray(scores, dtype=np.float64)  # [T]
    if scores.size == 0:
        return None
    w = min(window, scores.size)
    sums = np.convolve(scores, np.ones(w), mode="valid")  # [T - w + 1]: sum of each window
    return Aggregate(float(scores.max()), float(scores.mean()), float(sums.max() / w), int(scores.size))

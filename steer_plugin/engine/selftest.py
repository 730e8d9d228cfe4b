"""The start-up self-test's plans and verdict: after one decode step steered along each bank's self-test row, did
the op run at every steered layer and add exactly the expected delta? (Steerer.self_test runs the step.)"""

from __future__ import annotations

import numpy as np
import torch

from steer_plugin.engine.tables import OP_NAMES, LayerPlan


class SelfTestError(RuntimeError):
    """The steering op did not fire, or did not change the residual as expected."""


def probe_plans(banks: dict, value: float) -> dict[int, LayerPlan]:
    """At every layer, one op: add `value` along the bank's self-test row, at every position."""
    return {
        layer: LayerPlan(
            bank_rows=np.array([bank.row("selftest", "selftest", 0)]),
            coef=np.array([[0.0, value, 0.0]], dtype=np.float32),
            positions=np.array([0], dtype=np.int8),
            last_n=np.array([0]),
            op_codes=np.array([OP_NAMES.index("selftest")], dtype=np.int8),
        )
        for layer, bank in banks.items()
    }


def check_probes(runtimes: dict, value: float) -> None:
    """SelfTestError naming the first layer whose op did not fire on row 0, or added another delta than
    `value` along the self-test row (the probe holds [fired per row, delta of row 0])."""
    for layer, rt in runtimes.items():
        fired, delta = rt.probe.cpu()
        if not bool((fired == 1).all()):
            raise SelfTestError(
                f"steer_plugin self-test: the steering op never ran at layer {layer} on a decode step. "
                "The layer hook was not compiled into the model (a hook added after compilation, or a "
                "graph replay that skips it); steering would silently do nothing. Refusing to start."
            )
        expected = torch.zeros_like(delta)
        expected[0] = value
        if not torch.allclose(delta, expected, atol=1e-3):
            raise SelfTestError(
                f"steer_plugin self-test: at layer {layer} the op ran on a decode step but did not add the "
                f"expected delta (got {delta[:4].tolist()}..., expected {expected[:4].tolist()}...). "
                "Refusing to start."
            )

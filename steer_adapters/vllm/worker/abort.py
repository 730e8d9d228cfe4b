"""`abort_when` on Model Runner V2: a custom logits processor through vLLM's public V2 interface
(vllm/v1/worker/gpu/sample/logits_processor/interface.py).

The worker adds the class to `model_config.logits_processors` before the model loads (install.py), so vLLM builds
one per worker. vLLM calls `add_request(slot, sampling_params)` for each request that enters the batch and
`apply(logits, ctx)` for each step it samples. When a request's `abort_when` fires in a forward (runner_v2.py), its
slot is armed; the next time its logits are sampled every row of the request (one per draft token under
speculative decoding: `ctx.expanded_idx_mapping`) becomes a certain end-of-sequence token, so the request ends
right there, before the token the crossing residual would have predicted.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

from steer_plugin.request.wire import WIRE_KEY, RequestPlan

logger = logging.getLogger("steer_plugin")

NO_EOS = -1
_latest: weakref.ref[AbortWhen] | None = None  # the processor vLLM built last in this process


def active() -> AbortWhen | None:
    """The processor vLLM built for this worker's sampler (one engine per worker process), if any."""
    return _latest() if _latest is not None else None


def decode_plan(wire: object) -> RequestPlan | None:
    """The plan, or None for a message not signed by this server (the workers run such a request unsteered)."""
    try:
        return RequestPlan.decode(wire)
    except Exception:
        return None


class AbortWhen(LogitsProcessor):
    """Forces end-of-sequence on the requests whose abort_when fired (by persistent request slot)."""

    def __init__(self, vllm_config, req_states):
        super().__init__(vllm_config, req_states)
        self.device = req_states.device
        self.eos = np.full(
            req_states.max_num_reqs, NO_EOS, dtype=np.int64
        )  # [slots] each request's end token
        self.aborts = np.zeros(req_states.max_num_reqs, dtype=bool)  # [slots] requests that take part
        self.armed = np.zeros(req_states.max_num_reqs, dtype=bool)  # [slots] fired, not yet forced
        # The worker's plan decoder (Steerer.plan_of: each plan decoded once per process), set by runner_v2.install.
        self.plan_of: Callable[[object], RequestPlan | None] = decode_plan
        global _latest
        _latest = weakref.ref(self)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        eos = getattr(sampling_params, "eos_token_id", None)
        self.eos[req_idx] = NO_EOS if eos is None else int(eos)
        wire = (sampling_params.extra_args or {}).get(WIRE_KEY)
        plan = None if wire is None else self.plan_of(wire)
        # Only requests that may abort need their logits processed (vLLM skips the stage for a batch of others).
        observe = plan.observe if plan is not None else None
        self.aborts[req_idx] = observe is not None and bool(observe.abort or observe.probe_abort)
        self.armed[req_idx] = False  # the slot's previous occupant's state goes
        return bool(self.aborts[req_idx])

    def arm(self, slots: np.ndarray) -> None:
        """These slots' requests end at their next sampled token (called after the forward that fired)."""
        slots = np.asarray(slots, dtype=np.int64)
        missing = slots[self.eos[slots] == NO_EOS]
        if missing.size:
            logger.error("steer_plugin: abort_when fired on a request without an end-of-sequence token")
        self.armed[slots[self.eos[slots] != NO_EOS]] = True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        # [rows, vocab] float32; ctx.idx_mapping_np [requests] host: skip without a device sync when none fires.
        slots = ctx.idx_mapping_np
        fired = slots[self.armed[slots]]
        if not fired.size:
            return logits
        self.armed[fired] = False
        armed = torch.zeros(self.armed.shape[0], dtype=torch.bool)
        armed[torch.from_numpy(fired)] = True
        eos = torch.from_numpy(self.eos)
        rows_slot = ctx.expanded_idx_mapping  # [rows] logits row -> slot
        forced_rows = armed.to(logits.device)[rows_slot]  # [rows]
        forced = torch.full_like(logits, float("-inf"))
        forced.scatter_(1, eos.to(logits.device)[rows_slot].clamp_(min=0)[:, None], 0.0)
        return torch.where(forced_rows[:, None], forced, logits)

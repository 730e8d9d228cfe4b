"""Lanes: the compact list of token rows that need the op's work in a step, in persistent buffers.

A captured CUDA graph takes no per-step host decision, so the host writes, before each forward, the rows that
need work (the steered rows; a layer's observed rows) into a device buffer with a fixed address, padded up to
a bucket size by repeating the last row, and a few device flags:
    fits[T]    some row needs work and the prepared batch fits a forward of T rows (T = 0..max_tokens)
    bucket[i]  the number of lanes is in bucket i (sizes: powers of two, then max_tokens; one-hot)
The fixed-shape op gates its work on these flags (gate.py): a replay runs only the branch of the live bucket,
and nothing but the flag check when no row needs work. A padding lane repeats a live row, so it computes and
writes exactly what that row's own lane does.
"""

from __future__ import annotations

import numpy as np
import torch

from steer_plugin.engine.gate import Flag, flags_of


def bucket_sizes(max_tokens: int) -> tuple[int, ...]:
    """Lane counts a branch is captured for: powers of two below max_tokens, then max_tokens."""
    sizes = []
    size = 1
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return (*sizes, max(max_tokens, 1))


class Lanes:
    """Up to max_tokens lanes (token rows), their bucket flags and fits-by-forward-size flags."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.max_tokens = max_tokens
        self.sizes = bucket_sizes(max_tokens)
        pin = device.type == "cuda"
        mirrored = device.type != "cpu"
        self.rows_host = torch.zeros(max(max_tokens, 1), dtype=torch.int64, pin_memory=pin)  # [M]
        # [M + 1 + buckets]: fits[T] for T = 0..M, then the bucket one-hot.
        self.flags_host = torch.zeros(max_tokens + 1 + len(self.sizes), dtype=torch.bool, pin_memory=pin)
        # What the op reads (a graph reads them at replay): the host tensors themselves on the CPU.
        self.rows = self.rows_host.to(device) if mirrored else self.rows_host  # [M]
        self.flags = self.flags_host.to(device) if mirrored else self.flags_host  # [M + 1 + buckets]
        self._buckets = flags_of(self.flags, self.flags_host, max_tokens + 1)  # views made once
        self._fits: dict[int, Flag] = {}  # by forward size, made on first use
        self.count = 0  # live lanes this step (host)
        self._state = (0, 0, -1)  # (count > 0, rows needed, bucket) the device flags hold
        self._copied = torch.cuda.Event() if pin else None  # host rows reusable after it

    # --- what the op reads ----------------------------------------------------------------------------------

    def fits(self, num_tokens: int) -> Flag:
        """Some lane is live and the prepared batch fits a forward of num_tokens rows."""
        i = min(num_tokens, self.max_tokens)
        flag = self._fits.get(i)
        if flag is None:
            flag = self._fits[i] = Flag(self.flags[i], self.flags_host.numpy()[i : i + 1])
        return flag

    def bucket(self, i: int) -> Flag:
        """The lane count is in bucket i."""
        return self._buckets[i]

    def buckets_upto(self, num_tokens: int) -> list[tuple[int, int]]:
        """(index, size) of every bucket a forward of num_tokens rows can have live (lanes <= rows)."""
        out = []
        for i, size in enumerate(self.sizes):
            out.append((i, size))
            if size >= num_tokens:
                break
        return out

    def live(self) -> torch.Tensor:
        """The live lanes' rows [count] (a view of the device buffer, valid for this step)."""
        return self.rows[: self.count]

    # --- host writes, once per step -------------------------------------------------------------------------

    def write(self, rows: np.ndarray, needed: int) -> None:
        """rows [n] ascending token rows that need work; needed: rows a forward must have for them to apply."""
        n = int(rows.size)
        if n == 0:
            self.clear()
            return
        if self._copied is not None:
            self._copied.synchronize()  # the last write's copies still read the pinned host buffers
        bucket = next(i for i, size in enumerate(self.sizes) if size >= n)
        size = self.sizes[bucket]
        lanes = self.rows_host.numpy()
        lanes[:n] = rows
        lanes[n:size] = rows[-1]  # padding repeats the last live row
        state = (1, int(needed), bucket)
        self.count = n
        if self.rows is not self.rows_host:
            self.rows[:size].copy_(self.rows_host[:size], non_blocking=True)
        if state != self._state:
            flags = self.flags_host.numpy()
            flags[:] = False
            flags[min(needed, self.max_tokens) : self.max_tokens + 1] = True
            flags[self.max_tokens + 1 + bucket] = True
            if self.flags is not self.flags_host:
                self.flags.copy_(self.flags_host, non_blocking=True)
            self._state = state
        if self._copied is not None:
            self._copied.record()

    def clear(self) -> None:
        """No lane is live: every gate closed (on the device without a host copy)."""
        self.count = 0
        if self._state[0] == 0:
            return
        if self._copied is not None:
            self._copied.synchronize()
        self.flags_host.numpy()[:] = False
        if self.flags is not self.flags_host:
            self.flags.fill_(False)
        self._state = (0, 0, -1)

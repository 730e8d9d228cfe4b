"""What comes back from the workers for an observed request: one `TokenRecord` per token and SAE, one
`ProbeRecord` per token and probe, one `ResidualRecord` per token and layer read raw (the fit endpoints).

The worker's observer (steer_plugin.engine.observe) writes them, the observation channel
(steer_plugin.monitor.channel) carries them as JSON lines, and the API process (steer_plugin.readback.Observation)
reads them back: this module is the one definition both sides share.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

import numpy as np

Activation = tuple[int, float]  # (feature index, activation)


class TokenRecord(NamedTuple):
    """The features one SAE read at one token position of one request."""

    pos: int  # token position in the sequence (the residual at `pos` predicts token pos + 1)
    num_prompt: int  # the request's prompt length
    sae: str
    top: tuple[Activation, ...]  # the top-K active features (activation > 0), strongest first
    sink: bool = False  # an attention-sink position (config monitoring.sink_positions): left out of figures
    l0: int | None = None  # monitored SAEs: active features at this token
    error: float | None = None  # monitored SAEs: relative reconstruction error
    watch: tuple[Activation, ...] = ()  # watched / traced features whose activation passed their threshold
    abort: Activation | None = None  # the abort_when condition that fired at this token

    def to_json(self) -> dict:
        out: dict = {
            "pos": self.pos,
            "P": self.num_prompt,
            "sae": self.sae,
            "top": [list(t) for t in self.top],
        }
        if self.sink:
            out["sink"] = True
        if self.l0 is not None:
            out["l0"] = self.l0
        if self.error is not None:
            out["err"] = self.error
        if self.watch:
            out["watch"] = [list(w) for w in self.watch]
        if self.abort is not None:
            out["abort"] = list(self.abort)
        return out

    @classmethod
    def from_json(cls, data: dict) -> TokenRecord:
        abort = data.get("abort")
        return cls(
            int(data["pos"]),
            int(data["P"]),
            str(data["sae"]),
            tuple((int(i), float(a)) for i, a in data["top"]),
            bool(data.get("sink", False)),
            None if data.get("l0") is None else int(data["l0"]),
            None if data.get("err") is None else float(data["err"]),
            tuple((int(i), float(a)) for i, a in data.get("watch", ())),
            None if abort is None else (int(abort[0]), float(abort[1])),
        )


class ProbeRecord(NamedTuple):
    """One request's probe scores at one layer for the tokens of one step: one record per request, layer and step
    (not per token and probe: decoding writes one record per request per step)."""

    positions: tuple[int, ...]
    num_prompt: int
    probes: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]  # probe i's labels are the columns spans[i] of each row
    rows: list[list[float]]  # [len(positions), columns] the layer's scores at each position
    sinks: tuple[int, ...] = ()  # positions that are attention sinks (config monitoring.sink_positions)
    abort: tuple[int, str, int, float] | None = (
        None  # (position, probe, label index, score): an abort_when fired
    )

    def tokens(self) -> list[tuple[int, dict[str, tuple[float, ...]]]]:
        """(position, probe -> its scores) per token."""
        return [
            (pos, {pid: tuple(row[lo:hi]) for pid, (lo, hi) in zip(self.probes, self.spans)})
            for pos, row in zip(self.positions, self.rows)
        ]

    def to_json(self) -> dict:
        out: dict = {"pos": self.positions, "P": self.num_prompt, "probes": self.probes, "spans": self.spans}
        out["s"] = self.rows
        if self.sinks:
            out["sinks"] = self.sinks
        if self.abort is not None:
            out["abort"] = self.abort
        return out

    @classmethod
    def from_json(cls, data: dict) -> ProbeRecord:
        abort = data.get("abort")
        return cls(
            tuple(int(p) for p in data["pos"]),
            int(data["P"]),
            tuple(str(p) for p in data["probes"]),
            tuple((int(lo), int(hi)) for lo, hi in data["spans"]),
            [[float(v) for v in row] for row in data["s"]],
            tuple(int(p) for p in data.get("sinks", ())),
            None if abort is None else (int(abort[0]), str(abort[1]), int(abort[2]), float(abort[3])),
        )


class ResidualRecord(NamedTuple):
    """The residual after one layer at one token position, as the workers captured it (float32, exact)."""

    pos: int
    num_prompt: int
    layer: int
    x: str  # base64 of the little-endian float32 values [d_model]

    @classmethod
    def of(cls, pos: int, num_prompt: int, layer: int, row: np.ndarray) -> ResidualRecord:
        data = np.ascontiguousarray(row, dtype="<f4").tobytes()
        return cls(pos, num_prompt, layer, base64.b64encode(data).decode("ascii"))

    def values(self) -> np.ndarray:
        """[d_model] float32."""
        return np.frombuffer(base64.b64decode(self.x, validate=True), dtype="<f4").astype(np.float32)

    def to_json(self) -> dict:
        return {"pos": self.pos, "P": self.num_prompt, "layer": self.layer, "x": self.x}

    @classmethod
    def from_json(cls, data: dict) -> ResidualRecord:
        return cls(int(data["pos"]), int(data["P"]), int(data["layer"]), str(data["x"]))


Record = TokenRecord | ProbeRecord | ResidualRecord


def record_from_json(data: dict) -> Record:
    if "probes" in data:
        return ProbeRecord.from_json(data)
    if "x" in data:
        return ResidualRecord.from_json(data)
    return TokenRecord.from_json(data)

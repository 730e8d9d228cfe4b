"""What comes back from the workers for an observed request: one `TokenRecord` per token and SAE, one
`ProbeRecord` per token and probe, one `ResidualRecord` per token and layer read raw (the fit endpoints).

The worker's observer (steer_plugin.engine.observe) writes them, the observation transport
(steer_plugin.monitor.transport) carries them as msgpack (`encode_records`), and the API process
(steer_plugin.readback.Observation) reads them back: this module is the one definition both sides share.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
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
        columns = list(zip(self.probes, self.spans))
        return [
            (pos, {pid: tuple(row[lo:hi]) for pid, (lo, hi) in columns})
            for pos, row in zip(self.positions, self.rows)
        ]


class ResidualRecord(NamedTuple):
    """The residual after one layer at one token position, as the workers captured it (float32, exact)."""

    pos: int
    num_prompt: int
    layer: int
    x: bytes  # the little-endian float32 values [d_model]

    @classmethod
    def of(cls, pos: int, num_prompt: int, layer: int, row: np.ndarray) -> ResidualRecord:
        return cls(pos, num_prompt, layer, np.ascontiguousarray(row, dtype="<f4").tobytes())

    def values(self) -> np.ndarray:
        """[d_model] float32."""
        return np.frombuffer(self.x, dtype="<f4").astype(np.float32)


Record = TokenRecord | ProbeRecord | ResidualRecord


_KINDS = (TokenRecord, ProbeRecord, ResidualRecord)  # a record's kind: its index here
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[tuple[int, msgspec.Raw]])


def encode_records(records: list[Record]) -> bytes:
    """msgpack: [[kind, record as an array], ...] (NamedTuples encode as arrays)."""
    return _ENCODER.encode([(_KINDS.index(type(r)), r) for r in records])


_STEP_DECODER = msgspec.msgpack.Decoder(list[tuple[bytes, msgspec.Raw]])


def encode_step(parts: dict[bytes, list[Record]]) -> bytes:
    """One worker's step for one API process: msgpack [[cid, [[kind, record], ...]], ...], in one buffer."""
    return _ENCODER.encode(
        [(cid, [(_KINDS.index(type(r)), r) for r in records]) for cid, records in parts.items()]
    )


def split_step(data: bytes) -> list[tuple[bytes, msgspec.Raw]]:
    """(cid, its records still encoded: `decode_records` reads them) per request of a step
    (msgspec.DecodeError / ValidationError when it is not one)."""
    return _STEP_DECODER.decode(data)


def decode_records(data: bytes | msgspec.Raw) -> list[Record]:
    """The records of one message, every field's type checked (msgspec.ValidationError / DecodeError, or
    ValueError for an unknown kind)."""
    out = []
    for kind, raw in _DECODER.decode(data):
        if not 0 <= kind < len(_KINDS):
            raise ValueError(f"unknown record kind {kind}")
        out.append(msgspec.msgpack.decode(raw, type=_KINDS[kind]))
    return out

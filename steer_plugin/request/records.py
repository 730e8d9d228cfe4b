"""What comes back from the workers for an observed request: one `TokenRecord` per token and SAE, its probe
scores (`ProbeRecord`), one `ResidualRecord` per token and layer read raw (the fit endpoints).

Probe scores travel as one `ProbeBlock` per API process, layer and step (every request's rows side by side, as
float32 bytes), so a worker's host work per scored request is a few list appends; the inbox reads a block back as
one `ProbeRecord` per request it owns.

The worker's observer (steer_plugin.engine.observe) writes them, the observation transport
(steer_plugin.monitor.transport) carries them as msgpack (`encode_records`), and the API process
(steer_plugin.readback.Observation) reads them back: this module is the one definition both sides share.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np

Activation = tuple[int, float]  # (feature index, activation)
# Probe scores are read back to this many decimals: float32 carries ~7 significant digits, and each streamed token
# reports every probe's scores (the full float64 text of a float32 doubles what a client parses).
SCORE_DECIMALS = 6


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
    """One request's probe scores at one layer for the tokens of one step, as the API process reads them (the
    inbox cuts them out of a `ProbeBlock`)."""

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


ProbeColumns = tuple[
    tuple[str, int, int], ...
]  # (probe, first column, end column) of each probe a request reads


class ProbeBlock(NamedTuple):
    """The probe scores of one step at one layer for every request of one API process, side by side: request j's
    rows are rows ends[j - 1]:ends[j] of `scores` (from 0), its probes `layouts[layout[j]]`."""

    cids: tuple[bytes, ...]  # the requests' correlation ids, in row order
    ends: tuple[int, ...]
    positions: tuple[int, ...]  # each row's token position
    num_prompt: tuple[int, ...]  # each request's prompt length
    layout: tuple[int, ...]  # each request's entry in `layouts`
    layouts: tuple[ProbeColumns, ...]
    columns: int
    scores: bytes  # little-endian float32 [len(positions), columns]
    sink_positions: int = 0  # positions below this are attention sinks
    aborts: tuple[
        tuple[int, int, str, int, float], ...
    ] = ()  # (request j, position, probe, label index, score)

    def requests(self) -> list[tuple[bytes, ProbeRecord]]:
        """(cid, its ProbeRecord) per request, scores to SCORE_DECIMALS; ValueError when the block does not hold
        together."""
        rows, n = len(self.positions), len(self.cids)
        if not (
            len(self.ends) == len(self.num_prompt) == len(self.layout) == n
            and self.columns >= 0
            and len(self.scores) == 4 * rows * self.columns
            and all(a <= b for a, b in zip((0, *self.ends), self.ends))
            and (not n or self.ends[-1] == rows)
            and all(0 <= i < len(self.layouts) for i in self.layout)
            and all(0 <= lo <= hi <= self.columns for cols in self.layouts for _, lo, hi in cols)
            and all(0 <= a[0] < n for a in self.aborts)
        ):
            raise ValueError("inconsistent probe block")
        values = np.frombuffer(self.scores, dtype="<f4").reshape(rows, self.columns)
        values = values.astype(np.float64).round(SCORE_DECIMALS).tolist()  # [rows, columns]
        layouts = [
            (tuple(p for p, _, _ in cols), tuple((lo, hi) for _, lo, hi in cols)) for cols in self.layouts
        ]
        aborts = {j: tuple(rest) for j, *rest in self.aborts}
        sink, out, start = self.sink_positions, [], 0
        for j, (cid, end) in enumerate(zip(self.cids, self.ends)):
            positions = self.positions[start:end]
            sinks = tuple(p for p in positions if p < sink) if positions and positions[0] < sink else ()
            probes, spans = layouts[self.layout[j]]
            record = ProbeRecord(
                positions, self.num_prompt[j], probes, spans, values[start:end], sinks, aborts.get(j)
            )
            out.append((cid, record))
            start = end
        return out


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


Record = TokenRecord | ProbeRecord | ResidualRecord  # what the API process reads per request


_KINDS = (TokenRecord, ResidualRecord)  # a record's kind on the wire: its index here (probes go in blocks)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[tuple[int, msgspec.Raw]])


def encode_records(records: list[Record]) -> bytes:
    """msgpack: [[kind, record as an array], ...] (NamedTuples encode as arrays)."""
    return _ENCODER.encode([(_KINDS.index(type(r)), r) for r in records])


_STEP_DECODER = msgspec.msgpack.Decoder(tuple[list[tuple[bytes, msgspec.Raw]], list[msgspec.Raw]])
_BLOCK_DECODER = msgspec.msgpack.Decoder(ProbeBlock)


def encode_step(parts: dict[bytes, list[Record]], blocks: list[ProbeBlock] = ()) -> bytes:
    """One worker's step for one API process, in one buffer: msgpack
    [[[cid, [[kind, record], ...]], ...], [probe block, ...]]."""
    by_cid = [(cid, [(_KINDS.index(type(r)), r) for r in records]) for cid, records in parts.items()]
    return _ENCODER.encode((by_cid, list(blocks)))


def split_step(data: bytes) -> tuple[list[tuple[bytes, msgspec.Raw]], list[msgspec.Raw]]:
    """A step's (cid, its records still encoded: `decode_records` reads them) per request, and its probe blocks
    still encoded (`decode_block`); msgspec.DecodeError / ValidationError when it is not one."""
    return _STEP_DECODER.decode(data)


def decode_block(data: bytes | msgspec.Raw) -> list[tuple[bytes, ProbeRecord]]:
    """A probe block's (cid, ProbeRecord) per request, every field's type and the block's shape checked
    (msgspec.ValidationError / DecodeError, ValueError)."""
    return _BLOCK_DECODER.decode(data).requests()


def decode_records(data: bytes | msgspec.Raw) -> list[Record]:
    """The records of one message, every field's type checked (msgspec.ValidationError / DecodeError, or
    ValueError for an unknown kind)."""
    out = []
    for kind, raw in _DECODER.decode(data):
        if not 0 <= kind < len(_KINDS):
            raise ValueError(f"unknown record kind {kind}")
        out.append(msgspec.msgpack.decode(raw, type=_KINDS[kind]))
    return out

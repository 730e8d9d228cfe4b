"""What comes back from the workers for an observed request: one `TokenRecord` per token and SAE, its probe
scores (`ProbeRecord`), one `ResidualRecord` per token and layer read raw (the fit endpoints).

A worker's step travels as one message per API process (`encode_step`): the SAE reads (`TokenBlock`, one per
SAE) and probe scores (`ProbeBlock`, one per layer) of all of that process's requests side by side as arrays, so
a worker's host work per observed request is a few list items, not a record per token; residual reads go per
request (`ResidualRecord`). The API process's inbox cuts each block into the records of the requests it owns.
The worker's observer (steer_plugin.engine.observe, .blocks) writes them, the observation transport
(steer_plugin.monitor.transport) carries them, and the API process (steer_plugin.readback.Observation) reads
them back: this module is the one definition both sides share.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import msgspec
import numpy as np

Activation = tuple[int, float]  # (feature index, activation)
# Probe scores are read back to this many decimals: float32 carries ~7 significant digits, and each streamed token
# reports every probe's scores (the full float64 text of a float32 doubles what a client parses).
SCORE_DECIMALS = 6


def rounded(values: np.ndarray, decimals: int) -> np.ndarray:
    """float32 values as float64 rounded to `decimals` places: the same numbers Python's round() gives (a float32
    times 10**decimals, for decimals <= 6, is exact in float64, so numpy's half-to-even rint rounds it as round()
    does), a whole array at a time."""
    return np.round(values.astype(np.float64), decimals)


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


def _rows_hold(ends: tuple[int, ...], rows: int, aborts: tuple[tuple, ...]) -> bool:
    """Whether a block's requests (one row end each) split its `rows` in order, and its aborts name them."""
    return (
        all(a <= b for a, b in zip((0, *ends), ends))
        and (ends[-1] == rows if ends else rows == 0)
        and all(0 <= a[0] < len(ends) for a in aborts)
    )


# (probe, first column, end column) of each probe a request reads
ProbeColumns = tuple[tuple[str, int, int], ...]


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
    aborts: tuple[tuple[int, int, str, int, float], ...] = ()  # (request j, position, probe, label, score)

    def size(self) -> int:
        """The records it stands for (one per request)."""
        return len(self.cids)

    def requests(self) -> list[tuple[bytes, ProbeRecord]]:
        """(cid, its ProbeRecord) per request, scores to SCORE_DECIMALS; ValueError when the block does not hold
        together."""
        rows, n = len(self.positions), len(self.cids)
        if not (
            len(self.ends) == len(self.num_prompt) == len(self.layout) == n
            and self.columns >= 0
            and len(self.scores) == 4 * rows * self.columns
            and _rows_hold(self.ends, rows, self.aborts)
            and all(0 <= i < len(self.layouts) for i in self.layout)
            and all(0 <= lo <= hi <= self.columns for cols in self.layouts for _, lo, hi in cols)
        ):
            raise ValueError("inconsistent probe block")
        values = np.frombuffer(self.scores, dtype="<f4").reshape(rows, self.columns)
        values = rounded(values, SCORE_DECIMALS).tolist()  # [rows, columns]
        layouts = [
            (tuple(p for p, _, _ in cols), tuple((lo, hi) for _, lo, hi in cols)) for cols in self.layouts
        ]
        # (the score to the same places as the token's own: an abort reports the score its token shows)
        aborts = {
            j: (pos, probe, label, round(score, SCORE_DECIMALS))
            for j, pos, probe, label, score in self.aborts
        }
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


WatchColumns = tuple[tuple[int, int, float], ...]  # (feature index, its column, threshold) a request watches


class TokenBlock(NamedTuple):
    """One SAE's reads of one step for every request of one API process, side by side: request j's rows are rows
    ends[j - 1]:ends[j] (from 0) of the arrays, read back as one TokenRecord per row (`records`)."""

    sae: str
    cids: tuple[bytes, ...]  # the requests' correlation ids, in row order
    ends: tuple[int, ...]
    positions: tuple[int, ...]  # each row's token position
    num_prompt: tuple[int, ...]  # each request's prompt length
    top_k: tuple[int, ...]  # each request's top K (at most `k`)
    stats: tuple[bool, ...]  # whether each request's rows carry L0 and reconstruction error
    watch: tuple[int, ...]  # each request's entry in `watches`
    watches: tuple[WatchColumns, ...]
    k: int
    indices: bytes  # little-endian int32 [rows, k]: the strongest features first
    values: bytes  # little-endian float32 [rows, k]: their activations
    l0: bytes  # little-endian int32 [rows] (read only for requests with stats)
    error: bytes  # little-endian float32 [rows] (read only for requests with stats)
    watched: int  # columns of `watched_values`
    watched_values: bytes  # little-endian float32 [rows, watched]
    sink_positions: int = 0  # positions below this are attention sinks
    aborts: tuple[tuple[int, int, int, float], ...] = ()  # (request j, position, feature index, activation)

    def size(self) -> int:
        """The records it stands for (one per row)."""
        return len(self.positions)

    def requests(self) -> list[tuple[bytes, list[TokenRecord]]]:
        """(cid, its TokenRecords) per request, activations to 4 places and errors to 5 (as the workers used to
        round them); ValueError when the block does not hold together."""
        rows, n, k, w = len(self.positions), len(self.cids), self.k, self.watched
        if not (
            len(self.ends)
            == len(self.num_prompt)
            == len(self.top_k)
            == len(self.stats)
            == len(self.watch)
            == n
            and k >= 0
            and w >= 0
            and len(self.indices) == len(self.values) == 4 * rows * k
            and len(self.l0) == len(self.error) == 4 * rows
            and len(self.watched_values) == 4 * rows * w
            and _rows_hold(self.ends, rows, self.aborts)
            and all(0 <= t <= k for t in self.top_k)
            and all(0 <= i < len(self.watches) for i in self.watch)
            and all(0 <= c < w for cols in self.watches for _, c, _ in cols)
        ):
            raise ValueError("inconsistent token block")
        raw = np.frombuffer(self.values, dtype="<f4").reshape(rows, k)
        positive = (raw > 0).sum(1).tolist()  # (strongest first: the positive ones lead each row)
        # Top-K puts NaN first: those rows take the per-value filter (a sum is NaN only when some value is, or
        # +inf meets -inf: a row too many filtered, never one too few).
        unordered = set(np.flatnonzero(np.isnan(raw).any(1)).tolist()) if math.isnan(raw.sum()) else ()
        values = rounded(raw, 4).tolist()
        indices = np.frombuffer(self.indices, dtype="<i4").reshape(rows, k).tolist()
        # (only what some request reads: a block's numpy calls cost more than its rows on a small step)
        l0 = error = watched = watched_4 = None
        if any(self.stats):
            l0 = np.frombuffer(self.l0, dtype="<i4").tolist()
            error = rounded(np.frombuffer(self.error, dtype="<f4"), 5).tolist()
        if w:
            watched_f32 = np.frombuffer(self.watched_values, dtype="<f4").reshape(rows, w)
            watched, watched_4 = watched_f32.tolist(), rounded(watched_f32, 4).tolist()
        aborts = {(j, pos): (index, round(value, 4)) for j, pos, index, value in self.aborts}
        sae, sink, positions, out, start = self.sae, self.sink_positions, self.positions, [], 0
        per_request = zip(self.cids, self.ends, self.num_prompt, self.top_k, self.stats, self.watch)
        for j, (cid, end, prompt, top_k, stats, watch_entry) in enumerate(per_request):
            watch = self.watches[watch_entry]
            records = []
            for r in range(start, end):
                pos = positions[r]
                if r in unordered:
                    top = tuple((i, v) for i, v in zip(indices[r][:top_k], values[r][:top_k]) if v > 0)
                else:
                    kept = min(top_k, positive[r])
                    top = tuple(zip(indices[r][:kept], values[r][:kept]))
                fired = (
                    tuple([(index, watched_4[r][c]) for index, c, bound in watch if watched[r][c] > bound])
                    if watch
                    else ()
                )
                records.append(
                    TokenRecord(
                        pos,
                        prompt,
                        sae,
                        top,
                        pos < sink,
                        l0[r] if stats else None,
                        error[r] if stats else None,
                        fired,
                        aborts.get((j, pos)) if aborts else None,
                    )
                )
            out.append((cid, records))
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
WireRecord = TokenRecord | ResidualRecord  # what travels per request (probe scores only in blocks)


_KINDS = (TokenRecord, ResidualRecord)  # a record's kind on the wire: its index here (probes go in blocks)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[tuple[int, msgspec.Raw]])


def encode_records(records: list[WireRecord]) -> bytes:
    """msgpack: [[kind, record as an array], ...] (NamedTuples encode as arrays)."""
    return _ENCODER.encode([(_KINDS.index(type(r)), r) for r in records])


Block = ProbeBlock | TokenBlock
_BLOCK_KINDS = (ProbeBlock, TokenBlock)  # a block's kind on the wire: its index here
_STEP_DECODER = msgspec.msgpack.Decoder(tuple[list[tuple[bytes, msgspec.Raw]], list[tuple[int, msgspec.Raw]]])


def encode_step(parts: dict[bytes, list[WireRecord]], blocks: list[Block] = ()) -> bytes:
    """One worker's step for one API process, in one buffer: msgpack
    [[[cid, [[kind, record], ...]], ...], [[block kind, block], ...]]."""
    by_cid = [(cid, [(_KINDS.index(type(r)), r) for r in records]) for cid, records in parts.items()]
    return _ENCODER.encode((by_cid, [(_BLOCK_KINDS.index(type(b)), b) for b in blocks]))


def split_step(data: bytes) -> tuple[list[tuple[bytes, msgspec.Raw]], list[tuple[int, msgspec.Raw]]]:
    """A step's (cid, its records still encoded: `decode_records` reads them) per request, and its (kind, block)
    still encoded (`decode_block`); msgspec.DecodeError / ValidationError when it is not one."""
    return _STEP_DECODER.decode(data)


def decode_block(kind: int, data: bytes | msgspec.Raw) -> list[tuple[bytes, list[Record]]]:
    """A block's (cid, its records) per request, every field's type and the block's shape checked
    (msgspec.ValidationError / DecodeError, ValueError, also for an unknown kind)."""
    if not 0 <= kind < len(_BLOCK_KINDS):
        raise ValueError(f"unknown block kind {kind}")
    block = msgspec.msgpack.decode(data, type=_BLOCK_KINDS[kind])
    if isinstance(block, ProbeBlock):
        return [(cid, [record]) for cid, record in block.requests()]
    return block.requests()


def decode_records(data: bytes | msgspec.Raw) -> list[Record]:
    """The records of one message, every field's type checked (msgspec.ValidationError / DecodeError, or
    ValueError for an unknown kind)."""
    out = []
    for kind, raw in _DECODER.decode(data):
        if not 0 <= kind < len(_KINDS):
            raise ValueError(f"unknown record kind {kind}")
        out.append(msgspec.msgpack.decode(raw, type=_KINDS[kind]))
    return out

"""The records the worker sends and the API process reads: one msgpack encoding both sides share
(request/records.py), every field's type checked on the way in."""

import msgspec
import numpy as np
import pytest

from steer_plugin.request.records import (
    ProbeBlock,
    ProbeRecord,
    ResidualRecord,
    TokenBlock,
    TokenRecord,
    decode_block,
    decode_records,
    encode_records,
    encode_step,
    rounded,
    split_step,
)


def test_every_kind_of_record_crosses_unchanged():
    full = TokenRecord(7, 5, "a", ((3, 2.5), (9, 0.25)), False, 12, 0.125, ((4, -1.5),), (4, -1.5))
    bare = TokenRecord(0, 5, "b", (), sink=True)
    row = np.linspace(-1, 1, 7, dtype=np.float32)
    residual = ResidualRecord.of(3, 5, 2, row)
    records = [full, bare, residual]
    decoded = decode_records(encode_records(records))
    assert decoded == records
    assert [type(r) for r in decoded] == [TokenRecord, TokenRecord, ResidualRecord]
    assert np.array_equal(decoded[2].values(), row)  # float32, bit for bit
    assert len(residual.x) == 4 * 7  # raw bytes, not base64 text


A, B, C = b"a" * 16, b"b" * 16, b"c" * 16
SCORES = np.array([[0.5, 0.25, -1.0], [1.0, 0.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]], dtype=np.float32)


def block(**changes) -> ProbeBlock:
    """Requests A (positions 0, 1: position 0 a sink; probes p, q), B (position 9; probe q only, its abort_when
    fired there) and C (no row this step) of one layer whose probes p (2 labels) and q (1) fill 3 columns; the
    fourth row is B's."""
    fields = dict(
        cids=(A, B, C),
        ends=(2, 3, 3),
        positions=(0, 1, 9),
        num_prompt=(2, 8, 4),
        layout=(0, 1, 1),
        layouts=((("p", 0, 2), ("q", 2, 3)), (("q", 2, 3),)),
        columns=3,
        scores=SCORES[:3].tobytes(),
        sink_positions=1,
        aborts=((1, 9, "q", 0, 5.0),),
    )
    return ProbeBlock(**{**fields, **changes})


def read_back(sent) -> dict[bytes, list]:
    """A block through a step's encoding and back: each request's records by cid."""
    parts, blocks = split_step(encode_step({}, [sent]))
    assert parts == []
    ((kind, raw),) = blocks
    return dict(decode_block(kind, raw))


def test_a_probe_block_is_read_back_as_one_record_per_request():
    """One block per layer and step carries every request's scores; each request gets its rows, its probes'
    columns, its sinks and its abort_when, bit for bit (float32)."""
    got = {cid: record for cid, (record,) in read_back(block()).items()}
    assert got[A] == ProbeRecord((0, 1), 2, ("p", "q"), ((0, 2), (2, 3)), SCORES[:2].tolist(), (0,), None)
    assert got[B] == ProbeRecord((9,), 8, ("q",), ((2, 3),), SCORES[2:3].tolist(), (), (9, "q", 0, 5.0))
    assert got[C].positions == () and got[C].rows == []
    assert got[A].tokens() == [(0, {"p": (0.5, 0.25), "q": (-1.0,)}), (1, {"p": (1.0, 0.0), "q": (2.0,)})]


def test_probe_scores_are_read_to_six_decimals():
    """A float32 score comes back as its value to 6 decimals (short JSON), not float32's float64 expansion."""
    third = np.array([[1 / 3, -2 / 3, 1234.5678]], dtype="<f4")
    layouts = ((("p", 0, 3),),)
    one = ProbeBlock((A,), (1,), (5,), (4,), (0,), layouts, 3, third.tobytes())
    ((record,),) = read_back(one).values()
    assert record.rows == [[0.333333, -0.666667, 1234.567749]]


@pytest.mark.parametrize(
    "changes",
    [
        {"scores": SCORES.tobytes()},  # one row more than positions
        {"ends": (2, 1, 3)},  # rows going back
        {"ends": (2, 3, 2)},  # the last request does not end at the last row
        {"cids": (A, B)},  # a request without a cid
        {"layout": (0, 2, 1)},  # a layout that is not there
        {"layouts": ((("p", 0, 4),), (("q", 2, 3),))},  # a span past the columns
        {"aborts": ((3, 9, "q", 0, 5.0),)},  # an abort of a request that is not there
        {"columns": -1},
    ],
)
def test_a_probe_block_that_does_not_hold_together_is_refused(changes):
    with pytest.raises(ValueError):
        decode_block(0, msgspec.msgpack.encode(block(**changes)))


def test_a_probe_record_never_travels_alone():
    """Probe scores go in blocks: a ProbeRecord is the API process's view of one, not a wire kind."""
    with pytest.raises(ValueError):
        encode_records([ProbeRecord((4,), 5, ("p",), ((0, 1),), [[0.5]])])


@pytest.mark.parametrize(
    "message",
    [
        [[0, [1, 2, "s", [[1, "not a number"]], False, None, None, [], None]]],  # a wrong type in a field
        [[9, [1, 2, "s", []]]],  # an unknown kind
        [[2, [1, 2, "s", []]]],  # a probe record on its own (probes travel in blocks)
        [[0, [1, 2]]],  # too few fields
        {"not": "a list"},
    ],
)
def test_a_malformed_message_is_refused(message):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError, ValueError)):
        decode_records(msgspec.msgpack.encode(message))


def token_block(**changes) -> TokenBlock:
    """SAE "s": request A (positions 0, 1: 0 a sink; top 2; monitored: L0 and error; watches feature 7 above
    0.5) and B (position 9; top 3, K = 3; watches nothing; its abort_when on feature 7 fired there)."""
    indices = np.array([[4, 7, 1], [7, 2, 3], [5, 6, 8]], "<i4")
    values = np.array([[2.123456, 0.5, 0.25], [1.0, 0.0, 0.0], [3.0, 2.0, 1.0]], "<f4")
    fields = dict(
        sae="s",
        cids=(A, B),
        ends=(2, 3),
        positions=(0, 1, 9),
        num_prompt=(2, 8),
        top_k=(2, 3),
        stats=(True, False),
        watch=(0, 1),
        watches=(((7, 0, 0.5),), ()),
        k=3,
        indices=indices.tobytes(),
        values=values.tobytes(),
        l0=np.array([12, 3, 0], "<i4").tobytes(),
        error=np.array([0.1234567, 0.5, np.nan], "<f4").tobytes(),
        watched=1,
        watched_values=np.array([[0.5], [0.75], [6.0]], "<f4").tobytes(),
        sink_positions=1,
        aborts=((1, 9, 7, 6.0),),
    )
    return TokenBlock(**{**fields, **changes})


def test_a_token_block_is_read_back_as_one_record_per_token():
    """Each request gets a TokenRecord per row: its top K (positive activations only, to 4 places), L0 and error
    where monitored, the watched features above their thresholds, the sink flag and its abort_when."""
    got = read_back(token_block())
    assert got[A] == [
        TokenRecord(0, 2, "s", ((4, 2.1235), (7, 0.5)), True, 12, 0.12346, (), None),  # 0.5 is not above 0.5
        TokenRecord(1, 2, "s", ((7, 1.0),), False, 3, 0.5, ((7, 0.75),), None),
    ]
    assert got[B] == [TokenRecord(9, 8, "s", ((5, 3.0), (6, 2.0), (8, 1.0)), False, None, None, (), (7, 6.0))]


@pytest.mark.parametrize(
    "changes",
    [
        {"top_k": (2, 4)},  # more than K
        {"ends": (2, 2)},  # a row that belongs to no request
        {"l0": b"\0" * 8},  # one value short
        {"watched_values": b"\0" * 16},  # one value over
        {"watches": (((7, 1, 0.5),), ())},  # a column past `watched`
        {"watch": (0, 2)},  # a watch list that is not there
        {"stats": (True,)},  # a request without its flag
        {"aborts": ((2, 9, 7, 6.0),)},  # an abort of a request that is not there
    ],
)
def test_a_token_block_that_does_not_hold_together_is_refused(changes):
    with pytest.raises(ValueError):
        decode_block(1, msgspec.msgpack.encode(token_block(**changes)))


def test_an_unknown_block_kind_is_refused():
    with pytest.raises(ValueError, match="unknown block kind"):
        decode_block(2, msgspec.msgpack.encode(token_block()))


@pytest.mark.parametrize("decimals", [4, 5, 6])
def test_rounding_a_block_at_once_gives_what_round_gives(decimals):
    """Blocks are rounded a whole array at a time; for float32 values that is Python's round(), value for value,
    ties (exact halves) included."""
    rng = np.random.default_rng(decimals)
    x = np.concatenate(
        [rng.standard_normal(50_000).astype(np.float32) * s for s in (0.01, 1.0, 100.0, 10_000.0)]
        + [((np.arange(-5000, 5000) + 0.5) / 10**decimals).astype(np.float32)]
    )
    assert rounded(x, decimals).tolist() == [round(v, decimals) for v in x.astype(np.float64).tolist()]


def test_a_row_with_nan_keeps_only_its_positive_activations():
    """Top-K ranks NaN first (an overflowed residual): that row falls back to the per-value filter over its top K,
    so NaN never reaches a response and the positive activations after it are kept (A's top 2: NaN and 3.0)."""
    values = np.array([[np.nan, 3.0, 1.0], [2.0, 1.0, 0.0], [5.0, 4.0, 3.0]], "<f4").tobytes()
    got = read_back(token_block(values=values))
    assert [r.top for r in got[A]] == [((7, 3.0),), ((7, 2.0), (2, 1.0))]


def test_a_probe_abort_reports_its_score_as_its_token_shows_it():
    """To the scores' decimals: the abort's score is the one its token reports."""
    (record,) = read_back(block(aborts=((1, 9, "q", 0, 0.73456789),)))[B]
    assert record.abort == (9, "q", 0, 0.734568)

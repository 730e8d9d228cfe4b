"""The records the worker sends and the API process reads: one msgpack encoding both sides share
(request/records.py), every field's type checked on the way in."""

import msgspec
import numpy as np
import pytest

from steer_plugin.request.records import (
    ProbeRecord,
    ResidualRecord,
    TokenRecord,
    decode_records,
    encode_records,
)


def test_every_kind_of_record_crosses_unchanged():
    full = TokenRecord(7, 5, "a", ((3, 2.5), (9, 0.25)), False, 12, 0.125, ((4, -1.5),), (4, -1.5))
    bare = TokenRecord(0, 5, "b", (), sink=True)
    probe = ProbeRecord(
        (4, 5), 5, ("p", "q"), ((0, 2), (2, 3)), [[0.5, 0.25, -1.0], [1.0, 0.0, 2.0]], (0,), None
    )
    row = np.linspace(-1, 1, 7, dtype=np.float32)
    residual = ResidualRecord.of(3, 5, 2, row)
    records = [full, bare, probe, residual]
    decoded = decode_records(encode_records(records))
    assert decoded == records
    assert [type(r) for r in decoded] == [TokenRecord, TokenRecord, ProbeRecord, ResidualRecord]
    assert np.array_equal(decoded[3].values(), row)  # float32, bit for bit
    assert len(residual.x) == 4 * 7  # raw bytes, not base64 text


@pytest.mark.parametrize(
    "message",
    [
        [[0, [1, 2, "s", [[1, "not a number"]], False, None, None, [], None]]],  # a wrong type in a field
        [[9, [1, 2, "s", []]]],  # an unknown kind
        [[0, [1, 2]]],  # too few fields
        {"not": "a list"},
    ],
)
def test_a_malformed_message_is_refused(message):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError, ValueError)):
        decode_records(msgspec.msgpack.encode(message))

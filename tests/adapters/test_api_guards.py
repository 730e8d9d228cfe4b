"""The API process's small guards: the launcher's printed command line, the admin key's length, the request id a
plan is bound to, and reading a body the way vLLM reads it (any JSON encoding)."""

from __future__ import annotations

import json

import pytest

from steer_adapters.vllm.api.asgi import json_as_vllm_reads_it
from steer_adapters.vllm.api.launcher import masked
from steer_adapters.vllm.api.request_ids import assign_request_id
from steer_plugin.config import ConfigError, parse_config
from steer_plugin.request.schema import SpecError


def test_the_printed_command_line_hides_the_api_key():
    args = ["--model", "m", "--api-key", "s3cret", "--port", "1", "--api-key=other", "--api-keys", "x"]
    assert masked(args) == [
        "--model",
        "m",
        "--api-key",
        "***",
        "--port",
        "1",
        "--api-key=***",
        "--api-keys",
        "x",
    ]


def test_a_short_admin_key_from_the_environment_is_refused(monkeypatch, tmp_path):
    config = parse_config({"runtime": {"layers": [1], "rows_per_layer": 4, "roots": [str(tmp_path)]}})
    monkeypatch.setenv("STEER_ADMIN_KEY", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        config.runtime.key()
    monkeypatch.setenv("STEER_ADMIN_KEY", "x" * 16)
    assert config.runtime.key() == "x" * 16


def scope(path: str, *headers: tuple[bytes, bytes]) -> dict:
    return {"path": path, "headers": list(headers)}


def test_the_request_id_a_plan_is_bound_to_is_the_one_vllm_uses():
    assert assign_request_id(scope("/v1/chat/completions", (b"x-request-id", b"trace-1")), {}) == (
        "trace-1",
        None,
    )
    assert assign_request_id(scope("/v1/completions"), {"request_id": "mine"}) == ("mine", None)
    fresh, header = assign_request_id(scope("/v1/messages"), {"request_id": "ignored"})
    assert fresh == header and len(fresh) == 32  # sent as X-Request-Id: vLLM uses the header
    body: dict = {}
    given, header = assign_request_id(scope("/v1/responses", (b"x-request-id", b"h")), body)
    assert header is None and given == body["request_id"] and given.startswith("resp_")  # body only
    with pytest.raises(SpecError) as err:
        assign_request_id(scope("/v1/chat/completions", (b"x-request-id", b"x" * 300)), {})
    assert err.value.path == "x-request-id"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_bodies_are_read_in_every_json_encoding(encoding):
    body = {"vllm_xargs": {"steer_plugin": "x"}}
    assert json_as_vllm_reads_it(json.dumps(body).encode(encoding)) == body
    assert json_as_vllm_reads_it(b"--boundary\r\nContent-Disposition: form-data") is None
    assert json_as_vllm_reads_it(b"") is None

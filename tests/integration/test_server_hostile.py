"""A shared server under hostile input (`steer-serve --api-key`): authentication on every plugin route, forged
plugin keys on every endpoint that takes vllm_xargs, malformed bodies on a keep-alive connection, modes the
plugin cannot honour, the prefix cache under inspect, and the private run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from .conftest import running_server

pytestmark = pytest.mark.server

PORT = 18767 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
RESERVED = ("steer_plugin", "steer_plugin_observe")


@pytest.fixture(scope="module")
def tmpdir_of_server(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, tmpdir_of_server):
    env = {**os.environ, "TMPDIR": str(tmpdir_of_server)}
    env.pop("STEER_PLUGIN_WIRE_KEY", None)
    with running_server(demo_assets.model_dir, steer_config_path, PORT, "--api-key", KEY, env=env) as proc:
        yield proc
    leftovers = list(tmpdir_of_server.glob("steer*"))
    assert leftovers == [], f"the plugin left files behind: {leftovers}"


@pytest.fixture(scope="module")
def session(server) -> requests.Session:
    s = requests.Session()  # one keep-alive connection for the whole module
    s.headers.update(AUTH)
    return s


def completion(session, steering=None, **body):
    payload = {
        "model": "demo",
        "prompt": "The capital of France is",
        "max_tokens": 4,
        "temperature": 0,
        **body,
    }
    if steering is not None:
        payload["steering"] = steering
    return session.post(f"{BASE}/v1/completions", json=payload, timeout=120)


def assert_usable(session):
    """The same keep-alive connection still serves a normal request, and the engine is alive."""
    r = completion(session)
    assert r.status_code == 200, r.text
    assert requests.get(f"{BASE}/health", timeout=10).status_code == 200


def assert_error(r, status: int, param: str | None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for internal in ("Traceback", "Exceeds the limit", "TypeError", "recursion", "object has no attribute"):
        assert internal not in error["message"], error["message"]


ADD = {"features": [{"sae": "demo", "index": 123, "op": "add", "value": 0.8, "normalize": True}]}


# --- authentication ---------------------------------------------------------------------------------------


def test_plugin_routes_obey_the_api_key(server, session):
    anonymous = requests.Session()
    for method, path, body in (
        ("GET", "/v1/steering/saes", None),
        ("GET", "/v1/steering/features?q=a", None),
        ("POST", "/v1/steering/inspect", {"text": "hello"}),
        ("POST", "/v1/completions", {"model": "demo", "prompt": "x", "steering": {"features": [{"bad": 1}]}}),
        ("POST", "/v1/responses", {"model": "demo", "input": "x", "vllm_xargs": {"steer_plugin": "x"}}),
    ):
        r = anonymous.request(method, BASE + path, json=body, timeout=60)
        assert r.status_code == 401, (path, r.status_code, r.text)
        r = anonymous.request(method, BASE + path, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (path, r.status_code)
    assert session.get(f"{BASE}/v1/steering/saes", timeout=10).status_code == 200
    r = session.post(f"{BASE}/v1/steering/inspect", json={"text": "The bridge", "top_k": 2}, timeout=120)
    assert r.status_code == 200, r.text
    assert all(tok["features"]["demo"] for tok in r.json()["data"][1:])
    assert requests.get(f"{BASE}/health", timeout=10).status_code == 200  # not guarded, like vLLM's own
    # The playground page is static and holds no data (every call it makes sends the key the user types in):
    # served without a key, like /health; inspect with traced features obeys the key like the rest.
    page = anonymous.get(f"{BASE}/playground", timeout=10)
    assert page.status_code == 200 and "demo" not in page.text
    traced = {"text": "hi", "features": [{"sae": "demo", "index": 1}]}
    assert anonymous.post(f"{BASE}/v1/steering/inspect", json=traced, timeout=60).status_code == 401


# --- endpoints that take vllm_xargs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/responses", {"model": "demo", "input": "Hello", "max_output_tokens": 4}),
        ("/v1/messages", {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"model": "demo", "prompt": "Hi", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
        ),
    ],
)
def test_forged_plugin_keys_are_refused_everywhere(session, path, body):
    for key in RESERVED:
        forged = {**body, "vllm_xargs": {key: '["a/b", ["demo"], -1, false]'}}
        assert_error(session.post(BASE + path, json=forged, timeout=60), 400, f"vllm_xargs.{key}")
    # A JSON escape cannot hide the key: the body is parsed, not grepped.
    escaped = json.dumps({**body, "vllm_xargs": {"X": 1}}).replace('"X"', '"steer\\u005fplugin_observe"')
    r = session.post(BASE + path, data=escaped, headers={"Content-Type": "application/json"}, timeout=60)
    assert_error(r, 400, "vllm_xargs.steer_plugin_observe")
    assert_usable(session)


def test_steering_applies_on_responses_and_messages(session):
    r = session.post(
        f"{BASE}/v1/responses",
        json={"model": "demo", "input": "Hello", "max_output_tokens": 4, "temperature": 0, "steering": ADD},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    inspect = {"inspect": {"top_k": 2}}
    r = session.post(
        f"{BASE}/v1/messages",
        json={
            "model": "demo",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}],
            "steering": inspect,
        },
        timeout=60,
    )
    assert_error(r, 400, "steering.inspect")


# --- malformed bodies, on one keep-alive connection --------------------------------------------------------


def test_malformed_bodies_get_a_400_naming_the_field_and_the_connection_survives(session):
    deep = '{"model": "demo", "prompt": "x", "steering": ' + "[" * 5000 + "]" * 5000 + "}"
    huge_int = '{"model": "demo", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}"
    cases = [
        (deep, 400, "body"),
        (huge_int, 400, "body"),
        ('{"model": "demo", "prompt": "x", "steering": {"features": [}', 400, "body"),
        (b"\xff\xfe{}", 400, "body"),
        (
            json.dumps({"model": "demo", "prompt": "x", "n": "2", "steering": {"inspect": {}}}),
            400,
            "steering.inspect",
        ),
        (json.dumps({"model": "demo", "prompt": "x", "n": "two", "steering": ADD}), 400, "n"),
        (json.dumps({"model": "demo", "prompt": "x", "n": [1], "steering": ADD}), 400, "n"),
        (
            json.dumps(
                {"model": "demo", "prompt": "x", "steering": {"features": [{"id": "a/b/\u00b2", "value": 1}]}}
            ),
            400,
            "steering.features[0].id",
        ),
        (
            json.dumps(
                {
                    "model": "demo",
                    "prompt": "x",
                    "steering": {"features": [{"sae": "demo", "index": 10**400, "value": 1}]},
                }
            ),
            400,
            "steering.features[0].index",
        ),
        (
            json.dumps(
                {
                    "model": "demo",
                    "prompt": "x",
                    "steering": {"features": [{"sae": "demo", "index": 1, "value": 1e400}]},
                }
            ),
            400,
            "steering.features[0].value",
        ),
        (json.dumps({"model": "demo", "prompt": "x", "steering": "nope"}), 400, "steering"),
        (json.dumps({"model": "demo", "prompt": "x", "vllm_xargs": [1]}), 400, "vllm_xargs"),
    ]
    for body, status, param in cases:
        data = body if isinstance(body, bytes) else body.encode()
        r = session.post(
            f"{BASE}/v1/completions", data=data, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert_error(r, status, param)
        assert_usable(session)
    r = session.get(f"{BASE}/v1/steering/features", params={"limit": "\u00b2"}, timeout=10)
    assert_error(r, 400, "limit")
    r = session.post(f"{BASE}/v1/steering/inspect", data=deep.encode(), timeout=10)
    assert_error(r, 400, "body")
    assert_usable(session)


def test_modes_that_cannot_be_honoured_are_refused(session):
    r = completion(session, ADD, use_beam_search=True, n=2)
    assert_error(r, 400, "use_beam_search")
    r = completion(session, {"inspect": {"top_k": 2}}, prompt=["one prompt", "another prompt"])
    assert_error(r, 400, "steering.inspect")
    r = completion(session, ADD, prompt=["one prompt", "another prompt"])  # steering alone is fine
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_streaming_n2_reports_applied_on_every_choice(session):
    r = completion(session, ADD, n=2, stream=True, temperature=1.0, seed=1)
    assert r.status_code == 200
    applied = {}
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        for choice in json.loads(line[6:])["choices"]:
            if "applied" in choice.get("steering", {}):
                applied.setdefault(choice["index"], 0)
                applied[choice["index"]] += 1
    assert applied == {0: 1, 1: 1}


# --- prefix cache -------------------------------------------------------------------------------------------


def test_inspect_reports_prompt_features_when_the_prompt_is_cached(session):
    text = "The Golden Gate Bridge spans the strait into San Francisco Bay. " * 20  # > 2 KV blocks
    first = session.post(f"{BASE}/v1/steering/inspect", json={"text": text, "top_k": 3}, timeout=300).json()
    plain = completion(session, prompt=text, max_tokens=1)  # caches the prompt
    assert plain.status_code == 200
    second = session.post(f"{BASE}/v1/steering/inspect", json={"text": text, "top_k": 3}, timeout=300).json()
    assert len(second["data"]) == len(first["data"]) > 256
    assert all(tok["features"]["demo"] for tok in second["data"][1:])
    for a, b in zip(first["data"], second["data"]):
        assert [f["index"] for f in a["features"]["demo"]] == [f["index"] for f in b["features"]["demo"]]


# --- observation transport ----------------------------------------------------------------------------------


def metric(session, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a family's samples on /metrics whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = session.get(f"{BASE}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and (labels or {}).items() <= sample.labels.items()
    )


def test_aborted_streams_leave_no_open_mailbox_and_nothing_on_disk(session, tmpdir_of_server):
    for _ in range(6):  # clients that disconnect mid-stream while their tokens are being observed
        r = session.post(
            f"{BASE}/v1/completions",
            json={
                "model": "demo",
                "prompt": "Count:",
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
                "steering": {"inspect": {"top_k": 2}},
            },
            stream=True,
            timeout=60,
        )
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
        r.close()
    completion(session, {"inspect": {"top_k": 2}})  # and a finished one
    deadline = time.time() + 60
    while metric(session, "steer_observation_open_requests") and time.time() < deadline:
        time.sleep(1)
    assert metric(session, "steer_observation_open_requests") == 0
    assert list(tmpdir_of_server.glob("steer*")) == []  # abstract IPC: nothing on disk
    assert_usable(session)


def inbox_addresses(server_pid: int) -> list[str]:
    """The observation inboxes of this server's processes: abstract Unix sockets (listed in /proc/net/unix) whose
    inode one of its processes holds."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat_file.parent.name), int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [server_pid]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    inodes = set()
    for pid in tree:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@steer-observe-") and fields[6] in inodes:
            found.add(f"ipc://{fields[7]}")
    return sorted(found)


def test_forged_and_stray_messages_to_the_inbox_are_dropped_and_counted(server, session):
    """Any local process can reach the abstract socket: what it sends is refused by reason, and observed
    requests are served right meanwhile."""
    import zmq

    addresses = inbox_addresses(server.pid)
    assert addresses, "no observation inbox found"
    reference = completion(session, {"inspect": {"top_k": 2}}).json()["choices"][0]["steering"]["tokens"]
    before = {
        r: metric(session, "steer_observation_dropped_total", {"reason": r})
        for r in ("malformed", "unauthenticated")
    }
    context = zmq.Context()
    try:
        for address in addresses:
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(address)
            sock.send_multipart([b"junk"])
            sock.send_multipart(
                [b"\x91\x92\xc4\x10" + b"\x00" * 16 + b"\x90", b"\x00" * 16]
            )  # a MAC under no key
            sock.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            completion(session, {"inspect": {"top_k": 2}})  # a read drains the inbox
            after = {r: metric(session, "steer_observation_dropped_total", {"reason": r}) for r in before}
            if all(after[r] > before[r] for r in before):
                break
    finally:
        context.term()
    assert all(after[r] >= before[r] + 1 for r in before), (before, after)
    assert (
        completion(session, {"inspect": {"top_k": 2}}).json()["choices"][0]["steering"]["tokens"] == reference
    )
    assert_usable(session)


# --- bounded fuzz and soak ----------------------------------------------------------------------------------

JUNK = [
    None,
    True,
    -1,
    0,
    2**70,
    1e308,
    -1e-308,
    "NaN",
    "Infinity",
    "",
    "\u00b2",
    "x" * 300,
    [],
    {},
    [[[]]],
    {"a": {}},
]


def mutate(value, rng, depth=0):
    """A random, often broken, variant of a JSON value."""
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(JUNK)
    if isinstance(value, dict) and depth < 6:
        out = {k: mutate(v, rng, depth + 1) if rng.random() < 0.4 else v for k, v in value.items()}
        if rng.random() < 0.2:
            out[rng.choice(["extra", "op", "value", "index", "sae", "positions"])] = rng.choice(JUNK)
        if out and rng.random() < 0.2:
            out.pop(rng.choice(list(out)))
        return out
    if isinstance(value, list) and depth < 6:
        out = [mutate(v, rng, depth + 1) if rng.random() < 0.4 else v for v in value]
        if rng.random() < 0.2:
            out = out * rng.randint(2, 12)
        return out
    return value


VALID = [
    ADD,
    {
        "features": [
            {"sae": "demo", "index": 7, "op": "clamp", "value": 30.0, "positions": {"last_prompt_tokens": 2}}
        ]
    },
    {
        "features": [{"sae": "demo", "index": 9, "op": "ablate", "positions": "generation"}],
        "vectors": [{"name": "unit", "scale": 2}],
    },
    {
        "features": [{"sae": "demo", "index": 11, "op": "scale", "value": 2}],
        "inspect": {"top_k": 3, "prompt": True},
    },
    {
        "features": [
            {
                "sae": "demo",
                "index": 12,
                "op": "clamp",
                "value": 5,
                "when": {"sae": "demo", "index": 3, "above": 0.5},
            }
        ],
        "abort_when": [{"sae": "demo", "index": 4, "above": 1.0}],
    },
    {
        "vectors": [
            {"values": [0.01] * 576, "layer": 8, "scale": 3, "when": {"sae": "demo", "index": 3, "below": 2}}
        ]
    },
]


def endpoint_body(path: str, rng) -> dict:
    if path == "/v1/completions":
        return {"model": "demo", "prompt": "Hello there", "max_tokens": 2}
    if path == "/v1/chat/completions":
        return {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    if path == "/v1/responses":
        return {"model": "demo", "input": "Hi", "max_output_tokens": 2}
    return {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def canary(session) -> dict:
    r = completion(session, prompt="The quick brown fox", max_tokens=6, logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]["top_logprobs"]}


def test_bounded_fuzz_never_breaks_the_server(session):
    import random

    rng = random.Random(1234)
    reference = canary(session)
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"]
    statuses: dict[int, int] = {}
    for i in range(120):
        path = rng.choice(paths)
        body = endpoint_body(path, rng)
        body["steering"] = mutate(rng.choice(VALID), rng) if rng.random() < 0.85 else rng.choice(JUNK)
        if rng.random() < 0.2:
            body["vllm_xargs"] = mutate({"steer_plugin": "x", "other": 1}, rng)
        if rng.random() < 0.2:
            body["n"] = rng.choice([1, 2, "2", "x", -1, 2.5, None])
        stream = path in paths[:2] and rng.random() < 0.4
        if stream:
            body["stream"] = True
        r = session.post(BASE + path, json=body, timeout=120, stream=stream)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, body, r.text[:500])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error) or path == "/v1/messages", error
        else:
            for _ in r.iter_lines():
                pass
        if i % 20 == 19:
            assert canary(session) == reference, "an unsteered request drifted during the fuzz"
    assert statuses.get(200, 0) >= 10 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 30, (
        statuses
    )
    assert_usable(session)


def test_short_soak_with_disconnects(server, session, tmp_path):
    report = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(Path(__file__).parents[2] / "scripts" / "soak.py"),
        "--base", BASE, "--server-pid", str(server.pid), "--api-key", KEY,
        "--warmup", "15", "--duration", "45", "--concurrency", "4", "--json", str(report), "--check",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    figures = json.loads(report.read_text())
    assert figures["requests"].get("dropped", 0) >= 3
    assert_usable(session)

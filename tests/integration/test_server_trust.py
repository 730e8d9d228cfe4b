"""Trust, round two, against one real server (`steer-serve --api-key`, an admin key, the demo model and SAE): the
admin surface (named pipes, links and loader options that leave runtime.roots), the policy on every read of a
denied SAE, what observation may cost, the smaller hostile inputs, a stalled engine on /health, and what another
process on the host can see (no signing key in any server process's environment)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import torch
from safetensors.torch import save_file

from .conftest import running_server

pytestmark = pytest.mark.server

PORT = 18827 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
API_KEY = "trust-test-api-key-7"
ADMIN_KEY = "trust-test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"X-Steer-Admin-Key": ADMIN_KEY, **AUTH}
NEURONPEDIA = "smollm2-135m/15-res-topk"  # the demo SAE's own neuronpedia_id (its cfg.json)
SECRET_TEXT = "OUTSIDE-SECRET-1 api_key=hunter2"
HEALTH_TIMEOUT_S = 3
MONITOR_MAX_BYTES = 4000
OBSERVE_CAPACITY, OBSERVE_WAIT_S, OBSERVE_MAX_PROMPT = 1000, 2.0, 300
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Name a bridge."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def places(demo_assets, tmp_path_factory, sae_layer) -> dict[str, Path]:
    """The admin root (a copy of the demo SAE, an SAE whose files link outside, one whose labels link outside,
    a named pipe as labels, sparsify folders) and a folder outside it holding what must stay unreadable."""
    base = tmp_path_factory.mktemp("trust")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    sae = Path(demo_assets.sae_dir)
    shutil.copytree(sae, root / "copy")
    (outside / "labels.json").write_text(json.dumps({"0": SECRET_TEXT, "1": SECRET_TEXT}))
    linked_labels = root / "linked-labels"
    shutil.copytree(sae, linked_labels)
    (linked_labels / "labels.json").unlink()
    (linked_labels / "labels.json").symlink_to(outside / "labels.json")
    shutil.copytree(sae, outside / "sae")
    linked_files = root / "linked-files"
    linked_files.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        (linked_files / name).symlink_to(outside / "sae" / name)
    fifo = root / "fifo-labels"
    shutil.copytree(sae, fifo)
    (fifo / "labels.json").unlink()
    os.mkfifo(fifo / "labels.json")
    for folder in (root / "sparsify", outside / "sparsify"):
        write_sparsify(folder / f"layers.{sae_layer}")
    return {"root": root, "outside": outside, "base": base}


def write_sparsify(folder: Path, d_in: int = 576, d_sae: int = 64) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": d_sae, "k": 8}))
    g = torch.Generator().manual_seed(3)
    save_file(
        {
            "encoder.weight": torch.randn(d_sae, d_in, generator=g) * 0.05,
            "encoder.bias": torch.zeros(d_sae),
            "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.05,
            "b_dec": torch.zeros(d_in),
        },
        str(folder / "sae.safetensors"),
    )


@pytest.fixture(scope="module")
def server_log(places) -> Path:
    return places["base"] / "server.log"


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, assets, sae_layer, places, server_log):
    config = json.loads(open(steer_config_path).read())
    sae = config["saes"][0]
    config["saes"] = [sae, {**sae, "id": "secret", "neuronpedia_id": "hidden/secret-source"}]
    d_sae = assets.saes["demo"].sae.d_sae
    config["policy"] = {
        "allow_inline_vectors": True,
        "denied_saes": ["secret"],
        "observation": {
            "max_prompt_tokens": OBSERVE_MAX_PROMPT,
            "max_cost_in_flight": OBSERVE_CAPACITY,
            "max_wait_s": OBSERVE_WAIT_S,
        },
    }
    config["runtime"] = {
        "layers": [sae_layer, 5],
        "rows_per_layer": 2 * d_sae + 8,  # two SAEs of the demo's width at once
        "roots": [str(places["root"])],
    }
    config["monitoring"] = {
        "saes": {"demo": {"sample_rate": 1.0}},
        "sink": "file",
        "path": str(places["base"] / "monitor.jsonl"),
        "max_bytes": MONITOR_MAX_BYTES,
        "backup_count": 2,
    }
    config["health_timeout_s"] = HEALTH_TIMEOUT_S
    path = places["base"] / "steer.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "STEER_ADMIN_KEY": ADMIN_KEY}
    env.pop("STEER_PLUGIN_WIRE_KEY", None)
    with open(server_log, "w") as log:
        with running_server(
            demo_assets.model_dir, str(path), PORT, "--api-key", API_KEY, env=env, log=log
        ) as proc:
            yield proc


def post(path: str, body=None, headers=AUTH, timeout: float = 120, **kwargs) -> requests.Response:
    return requests.post(BASE + path, json=body, headers=headers, timeout=timeout, **kwargs)


def chat(steering: dict | None = None, **extra) -> requests.Response:
    return post("/v1/chat/completions", {**CHAT, **extra, **({"steering": steering} if steering else {})})


def assert_error(r: requests.Response, status: int, param: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    return error


def assert_serving() -> None:
    r = chat()
    assert r.status_code == 200, r.text
    assert requests.get(BASE + "/health", timeout=10).status_code == 200


def admin_load(body: dict, timeout: float = 20) -> requests.Response:
    return post("/v1/steering/saes", body, headers=ADMIN, timeout=timeout)


def admin_unload(sae_id: str, timeout: float = 20) -> requests.Response:
    return requests.delete(f"{BASE}/v1/steering/saes/{sae_id}", headers=ADMIN, timeout=timeout)


# --- 1. a named pipe never blocks the admin lock, the engine or /health ------------------------------------


def test_a_named_pipe_as_labels_is_refused_at_once_and_nothing_waits_on_it(server, places):
    root = places["root"]
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        load = pool.submit(admin_load, {"id": "piped", "path": str(root / "fifo-labels")})
        time.sleep(0.5)
        other = admin_unload("never-loaded")  # an unrelated admin call does not wait for the load
        assert other.status_code == 404, other.text
        assert_error(load.result(), 400, "labels")
    assert time.monotonic() - start < 15
    r = admin_load(
        {"id": "piped2", "path": str(root / "copy"), "labels": str(root / "fifo-labels" / "labels.json")}
    )
    assert_error(r, 400, "labels")
    assert "not a regular file" in r.json()["error"]["message"]
    start = time.monotonic()
    assert_serving()  # a chat right after: the engine never opened the pipe
    assert time.monotonic() - start < 20
    assert "piped" not in {
        s["id"] for s in requests.get(BASE + "/v1/steering/saes", headers=AUTH).json()["data"]
    }


def test_health_answers_503_while_the_engine_is_stalled(server):
    assert requests.get(BASE + "/health", timeout=10).status_code == 200
    children = psutil.Process(server.pid).children(recursive=True)
    (core,) = [p for p in children if "EngineCore" in " ".join(p.cmdline())]
    core.send_signal(signal.SIGSTOP)  # a real stall: the engine core answers nothing while stopped
    try:
        start = time.monotonic()
        r = requests.get(BASE + "/health", timeout=HEALTH_TIMEOUT_S + 20)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["param"] == "engine" and time.monotonic() - start < HEALTH_TIMEOUT_S + 10
    finally:
        core.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while requests.get(BASE + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "/health did not recover after the engine resumed"
        time.sleep(1)
    assert_serving()


# --- 2. a denied SAE is never read -------------------------------------------------------------------------


def test_a_denied_sae_is_never_read(server):
    r = chat({"inspect": {"top_k": 3, "prompt": True}})
    assert r.status_code == 200, r.text
    steering = r.json()["choices"][0]["steering"]
    assert all(set(token) == {"demo"} for token in steering["tokens"] + steering["prompt_tokens"])
    r = post("/v1/steering/inspect", {"text": "The Golden Gate Bridge", "top_k": 2})
    assert r.status_code == 200, r.text
    assert all(set(item["features"]) == {"demo"} for item in r.json()["data"])
    denied = [
        ({"features": [{"sae": "demo", "index": 1, "value": 1, "when": {"sae": "secret", "index": 2, "above": 0}}]},
         "steering.features[0].when"),
        ({"vectors": [{"name": "unit", "when": {"sae": "secret", "index": 2, "below": 1}}]}, "steering.vectors[0].when"),
        ({"abort_when": [{"sae": "secret", "index": 2, "above": 1}]}, "steering.abort_when[0]"),
        ({"inspect": {"features": [{"sae": "secret", "index": 2}]}}, "steering.inspect.features[0]"),
        ({"inspect": {"features": [{"id": "hidden/secret-source/2"}]}}, "steering.inspect.features[0]"),
        ({"inspect": {"saes": ["secret"]}}, "steering.inspect.saes[0]"),
        ({"features": [{"sae": "secret", "index": 2, "value": 1}]}, "steering.features[0]"),
    ]  # fmt: skip
    for steering, param in denied:
        assert_error(chat(steering), 403, param)
    listed = requests.get(BASE + "/v1/steering/saes", headers=AUTH, timeout=10).json()
    assert [s["id"] for s in listed["data"]] == ["demo"]
    hits = requests.get(BASE + "/v1/steering/features", params={"q": "", "limit": 1000}, headers=AUTH).json()
    assert hits["total"] > 0 and {h["sae"] for h in hits["data"]} == {"demo"}
    for params in ({"sae": "secret", "q": "a"}, {"sae": "secret", "index": "2"}):
        r = requests.get(BASE + "/v1/steering/features", params=params, headers=AUTH, timeout=10)
        assert_error(r, 403, "sae")


# --- 3. admin loads stay under runtime.roots ---------------------------------------------------------------


def test_admin_loads_never_open_a_file_outside_the_roots(server, places, sae_layer):
    root, outside = places["root"], places["outside"]
    for hookpoint in (
        f"../../outside/sparsify/layers.{sae_layer}",
        str(outside / "sparsify" / f"layers.{sae_layer}"),
    ):
        r = admin_load({"id": "escape", "path": str(root / "sparsify"), "format": "sparsify",
                        "options": {"hookpoint": hookpoint}})  # fmt: skip
        assert_error(r, 403, "options.hookpoint")
    r = admin_load({"id": "linked", "path": str(root / "linked-files")})
    assert_error(r, 403, "path")
    r = admin_load({"id": "leaky", "path": str(root / "linked-labels")})
    assert_error(r, 403, "labels")
    for r in (
        requests.get(
            BASE + "/v1/steering/features", params={"q": "OUTSIDE-SECRET"}, headers=AUTH, timeout=10
        ),
        requests.get(BASE + "/v1/steering/saes", headers=AUTH, timeout=10),
    ):
        assert SECRET_TEXT not in r.text and "hunter2" not in r.text
    ok = admin_load({"id": "inside", "path": str(root / "sparsify"), "format": "sparsify",
                     "options": {"hookpoint": f"layers.{sae_layer}"}})  # fmt: skip
    assert ok.status_code == 201, ok.text
    assert admin_unload("inside").status_code == 200
    assert_serving()


# --- 4. observation has a cost bound ----------------------------------------------------------------------


def test_observation_is_bounded_per_request_and_server_wide_and_plain_requests_never_wait(server):
    long_text = (
        "The Golden Gate Bridge spans the strait. " * 38
    )  # ~350 tokens: > OBSERVE_MAX_PROMPT, < the context
    r = post("/v1/steering/inspect", {"text": long_text})
    assert_error(r, 403, "steering.inspect.prompt")
    r = chat({"inspect": {"prompt": True}}, messages=[{"role": "user", "content": long_text}])
    assert_error(r, 403, "steering.inspect.prompt")
    # Observing requests that each take most of the server's budget (a prompt of ~130 tokens computed again and
    # encoded, 300 generated: ~560 of 1000 token-encodes): one runs at a time, the others wait and, past
    # max_wait_s, get a 429; a plain request beside them is served at once.
    prompt = [{"role": "user", "content": "The Golden Gate Bridge spans the strait. " * 14}]
    body = {**CHAT, "messages": prompt, "max_tokens": 300, "ignore_eos": True}
    body["steering"] = {"inspect": {"top_k": 8, "prompt": True}}
    with ThreadPoolExecutor(4) as pool:
        observing = [pool.submit(post, "/v1/chat/completions", body, AUTH, 300) for _ in range(4)]
        time.sleep(1.0)
        start = time.monotonic()
        plain = chat()
        plain_s = time.monotonic() - start
        statuses = sorted(f.result().status_code for f in observing)
    assert plain.status_code == 200 and plain_s < 60
    assert statuses.count(200) >= 1 and 429 in statuses, statuses
    busy = next(f.result() for f in observing if f.result().status_code == 429)
    assert busy.json()["error"]["param"] == "steering"
    metrics = requests.get(BASE + "/metrics", headers=AUTH, timeout=30).text
    for name in (
        'steer_observation_cost_total{kind="generation"}',
        'steer_observation_refused_total{reason="busy"}',
        'steer_observation_refused_total{reason="request"}',
        "steer_observation_wait_seconds_count",
        "steer_observation_values_total",
    ):
        line = next(line for line in metrics.splitlines() if line.startswith(name))
        assert float(line.split()[-1]) > 0, line


# --- 5. the smaller ones ------------------------------------------------------------------------------------


def test_feature_ids_are_ascii_digits_and_a_nul_path_is_a_400(server, places):
    for index in ("\u00b2", "\u0663", "\uff13"):
        r = chat({"features": [{"id": f"{NEURONPEDIA}/{index}", "value": 1}]})
        assert_error(r, 400, "steering.features[0].id")
    assert chat({"features": [{"id": f"{NEURONPEDIA}/3", "value": 1}]}).status_code == 200
    for field in ("path", "labels", "explanations"):
        body = {"id": "nul", "path": str(places["root"] / "copy"), field: str(places["root"]) + "/a\u0000b"}
        assert_error(admin_load(body), 400, field)
    assert_serving()


def test_bodies_in_utf16_and_steering_on_endpoints_that_would_ignore_it_are_refused(server):
    batch = {"model": "demo", "messages": [[{"role": "user", "content": "Hi"}]], "max_tokens": 2}
    invocation = {**CHAT, "max_tokens": 2}
    for path, body in (("/v1/chat/completions/batch", batch), ("/invocations", invocation)):
        forged = {**body, "vllm_xargs": {"steer_plugin": "x"}}
        for encoding in ("utf-8", "utf-16", "utf-32"):
            data = json.dumps(forged).encode(encoding)
            r = requests.post(BASE + path, data=data, timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
            assert_error(r, 400, "vllm_xargs.steer_plugin")
            data = json.dumps({**body, "steering": {"features": [{"sae": "demo", "index": 1, "value": 1}]}})
            r = requests.post(BASE + path, data=data.encode(encoding), timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
            assert_error(r, 400, "steering")
        ok = requests.post(BASE + path, json=body, headers=AUTH, timeout=120)
        assert ok.status_code == 200, (path, ok.text)  # the endpoints themselves still serve


def test_a_client_leaving_an_observed_request_leaves_no_internal_error(server, server_log):
    body = {**CHAT, "max_tokens": 300, "ignore_eos": True, "steering": {"inspect": {"top_k": 2}}}
    payload = json.dumps(body).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            sock.sendall(head.encode() + payload)
            time.sleep(1.0)
        # closed before the answer: vLLM ends the request and answers `null`
    time.sleep(3)
    assert_serving()
    text = server_log.read_text(errors="replace")
    assert "internal error" not in text, text[text.find("internal error") - 2000 :][:4000]


def test_the_api_process_logs_its_info_lines_through_vllm(server, server_log):
    """vLLM sets its logging up in the API server after plugins load: the plugin's lines there still show."""
    text = server_log.read_text(errors="replace")
    line = next((x for x in text.splitlines() if "steer_plugin middleware: serving SAEs" in x), None)
    assert line is not None and "APIServer" in line and "INFO" in line, text[:3000]


def test_the_launcher_masks_the_api_key_and_refuses_a_short_admin_key(
    server, server_log, steer_config_path, places
):
    text = server_log.read_text(errors="replace")
    launch = next(line for line in text.splitlines() if line.startswith("steer-serve:"))
    assert "--api-key ***" in launch and API_KEY not in launch
    config = json.loads(open(steer_config_path).read())
    config["runtime"] = {"layers": [5], "rows_per_layer": 4, "roots": [str(places["root"])]}
    path = places["base"] / "short-key.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "STEER_ADMIN_KEY": "short"}
    cmd = [
        sys.executable,
        "-m",
        "steer_adapters.vllm.api.launcher",
        "--steer-config",
        str(path),
        "--model",
        "x",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("steer-serve started vLLM with a 5-character admin key")
    assert proc.returncode == 2 and "STEER_ADMIN_KEY must be at least 16" in proc.stderr, proc.stderr[-2000:]


def test_a_load_right_after_unloads_finds_the_freed_rows(server, places):
    root = places["root"]
    for sae_id in ("first", "second"):
        assert admin_load({"id": sae_id, "path": str(root / "copy")}, timeout=300).status_code == 201
    steered = chat({"features": [{"sae": "second", "index": 5, "value": 2.0}]})
    assert steered.status_code == 200, steered.text
    # The request that steered with `second` finished; the worker learns of that at its next step only.
    for sae_id in ("first", "second"):
        assert admin_unload(sae_id).status_code == 200
    for sae_id in ("third", "fourth"):  # both need a whole SAE's rows: `second`'s must be free already
        r = admin_load({"id": sae_id, "path": str(root / "copy")}, timeout=300)
        assert r.status_code == 201, r.text
    for sae_id in ("third", "fourth"):
        assert admin_unload(sae_id).status_code == 200
    assert_serving()


def test_series_of_unloaded_saes_go_with_them(server, places):
    assert admin_load({"id": "churn", "path": str(places["root"] / "copy")}, timeout=300).status_code == 201
    assert chat({"features": [{"sae": "churn", "index": 5, "value": 2.0}]}).status_code == 200
    metrics = requests.get(BASE + "/metrics", headers=AUTH, timeout=30).text
    assert 'sae="churn"' in metrics
    assert admin_unload("churn").status_code == 200
    metrics = requests.get(BASE + "/metrics", headers=AUTH, timeout=30).text
    assert 'sae="churn"' not in metrics


def test_the_monitoring_file_is_rotated(server, places):
    for _ in range(12):
        assert chat(max_tokens=8).status_code == 200
    path = places["base"] / "monitor.jsonl"
    assert Path(f"{path}.1").exists()
    assert path.stat().st_size <= MONITOR_MAX_BYTES and not Path(f"{path}.3").exists()


def test_thousands_of_inline_vectors_are_refused_by_count(server):
    vectors = [{"values": [0.001] * 576, "layer": 8}] * 20_000
    start = time.monotonic()
    r = chat({"vectors": vectors})
    assert_error(r, 400, "steering")
    assert time.monotonic() - start < 60
    assert_serving()


def test_the_playground_forbids_framing_and_foreign_scripts(server):
    r = requests.get(BASE + "/playground", timeout=10)
    policy = r.headers["content-security-policy"]
    assert (
        "frame-ancestors 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-eval" not in policy
    )
    assert r.headers["x-frame-options"] == "DENY"
    assert "localStorage.setItem" not in r.text


# --- 6. what a shared host can see ---------------------------------------------------------------------------


def test_no_server_process_holds_the_signing_key_in_its_environment(server):
    """Any process of the same user can read /proc/<pid>/environ and cmdline of the server's processes: the
    key that signs steering plans is in neither (signing.py: derived from the process tree's multiprocessing
    key). Steering still works across the processes."""
    steering = {"features": [{"sae": "demo", "index": 5, "value": 2.0}]}
    assert chat(steering).status_code == 200
    processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    assert len(processes) >= 3  # API server, engine core, worker
    for proc in processes:
        environ = dict(
            item.split(b"=", 1)
            for item in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        assert b"STEER_PLUGIN_WIRE_KEY" not in environ, (proc.pid, " ".join(proc.cmdline()))
        assert b"WIRE_KEY" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()


def test_a_plan_bound_to_the_id_the_client_gave_still_steers(server):
    """The signed plan names the request id vLLM builds the engine's id from: the client's X-Request-Id or
    `request_id` when given, else one the server picks; the workers run it only on that request."""
    body = {**CHAT, "max_tokens": 1, "logprobs": True, "temperature": 0}
    plain = post("/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"][0]["logprob"]
    steering = {"features": [{"sae": "demo", "index": 5, "op": "add", "value": 0.5, "normalize": True}]}
    for headers, extra in (
        ({"X-Request-Id": "client-trace-42"}, {}),
        ({}, {"request_id": "body-7"}),
        ({}, {}),
    ):
        r = post("/v1/chat/completions", {**body, **extra, "steering": steering}, headers={**AUTH, **headers})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["logprobs"]["content"][0]["logprob"] != plain  # the worker applied it
        assert r.json()["id"].startswith(
            "chatcmpl-" + headers.get("X-Request-Id", extra.get("request_id", ""))
        )


def test_the_hostile_fuzz_with_unicode_digits_and_utf16_bodies(server):
    """A bounded fuzz over the inputs of this round: feature ids with non-ASCII digits, bodies in UTF-16/32 on
    every endpoint, reserved keys in them; every answer is a 4xx naming a field or a 200, never a 500."""
    import random

    rng = random.Random(77)
    digits = ["\u00b2", "\u0663", "\uff13", "\u2468", "3", "07", "", "-1", "1e3"]
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/invocations",
             "/v1/responses", "/v1/messages", "/tokenize"]  # fmt: skip
    for _ in range(60):
        path = rng.choice(paths)
        body = {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        if path == "/v1/completions" or path == "/tokenize":
            body = {"model": "demo", "max_tokens": 2, "prompt": "Hi"}
        if path == "/v1/chat/completions/batch":
            body["messages"] = [body["messages"]]
        if path == "/v1/responses":
            body = {"model": "demo", "input": "Hi", "max_output_tokens": 2}
        roll = rng.random()
        if roll < 0.5:
            body["steering"] = {"features": [{"id": f"{NEURONPEDIA}/{rng.choice(digits)}", "value": 1}]}
        elif roll < 0.7:
            body["vllm_xargs"] = {rng.choice(["steer_plugin", "steer_plugin_observe"]): "x"}
        encoding = rng.choice(["utf-8", "utf-16", "utf-16-le", "utf-32"])
        r = requests.post(BASE + path, data=json.dumps(body).encode(encoding), timeout=120,
                          headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code < 500, (path, encoding, body, r.text[:300])
        if r.status_code >= 400 and path != "/v1/messages":
            assert "error" in r.json(), r.text
    assert_serving()


def test_every_endpoint_and_request_shape_keeps_its_plan(server, server_log):
    """Plans are bound to the id vLLM builds each engine request's id from, and admitted once per engine
    request: n choices, several prompts, compare's two variants, /v1/responses and /v1/messages all keep theirs
    (the engine core drops none, no worker rejects one)."""
    add = {"features": [{"sae": "demo", "index": 5, "op": "add", "value": 0.3, "normalize": True}]}
    cases = [
        ("/v1/chat/completions", {**CHAT, "n": 2, "temperature": 1.0, "steering": add}),
        ("/v1/completions", {"model": "demo", "prompt": ["One", "Two"], "n": 2, "max_tokens": 2,
                             "temperature": 1.0, "steering": add}),
        ("/v1/chat/completions", {**CHAT, "stream": True, "steering": {**add, "compare": True}}),
        ("/v1/responses", {"model": "demo", "input": "Hi", "max_output_tokens": 2, "steering": add}),
        ("/v1/messages", {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
                          "steering": add}),
    ]  # fmt: skip
    for path, body in cases:
        r = post(path, body)
        assert r.status_code == 200, (path, r.text)
    time.sleep(2)
    text = server_log.read_text(errors="replace")
    assert "steering of request" not in text, text[text.find("steering of request") :][:2000]
    metrics = requests.get(BASE + "/metrics", headers=AUTH, timeout=30).text
    assert 'steer_worker_rejected_messages_total{kind="steering"} 0.0' in metrics

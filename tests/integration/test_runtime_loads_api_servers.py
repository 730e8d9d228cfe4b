"""Runtime loads on a real server with two API server processes (`--api-server-count 2`: vLLM's
run_multi_api_server, both processes on one port with SO_REUSEPORT, one engine core). Every request goes on a
new TCP connection, so the kernel hands it to either process; which process served is seen per process on
/metrics (`steer_runtime_catalog_generation{pid}`: the generation of the workers' registry each process last
read, which it reads only when a request of its own needs it). Each phase sends until both processes have read
the newest generation, so each check below ran in both: a duplicate load is refused, a request naming a
runtime-loaded SAE and vector steers exactly like its configured / inline twin, and every process lists the
same catalog at the same generation."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from .conftest import running_server, write_runtime_config

pytestmark = pytest.mark.server

PORT = 18853 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
KEY = "api-servers-test-admin-key-0123456789"
ADMIN = {"X-Steer-Admin-Key": KEY}
RUNTIME_LAYER = 5  # nothing configured there: the vector steers only because the layer is reserved
BODY = {
    "model": "demo",
    "messages": [{"role": "user", "content": "Describe a famous landmark in one sentence."}],
    "max_tokens": 6,
    "temperature": 0,
    "logprobs": True,
    "top_logprobs": 3,
}
VECTOR = {"scale": 0.8, "normalize": True}


@pytest.fixture(scope="module")
def root(demo_assets, tmp_path_factory):
    """The admin API's allowed root: a copy of the demo SAE and a random unit vector."""
    folder = tmp_path_factory.mktemp("api-servers-root")
    shutil.copytree(demo_assets.sae_dir, folder / "demo-copy")
    vec = torch.randn(576, generator=torch.Generator().manual_seed(23))
    save_file({"v": vec / vec.norm()}, str(folder / "vec.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, assets, sae_layer, root, tmp_path_factory):
    rows = assets.saes["demo"].sae.d_sae + 4
    folder = tmp_path_factory.mktemp("api-servers-config")
    path = write_runtime_config(steer_config_path, folder, [sae_layer, RUNTIME_LAYER], rows, root)
    # steer-serve runs `vllm serve` for this (api/serve.py), which makes its own multiprocess metrics dir.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"STEER_ADMIN_KEY": KEY}
    with running_server(demo_assets.model_dir, path, PORT, "--api-server-count", "2", env=env) as proc:
        yield proc


def fresh(method: str, path: str, body: dict | None = None, headers: dict | None = None) -> requests.Response:
    """One request on a new TCP connection: either API process may answer it."""
    headers = {"Connection": "close", **(headers or {})}
    return requests.request(method, f"{BASE}{path}", json=body, headers=headers, timeout=300)


def chat(steering: dict) -> requests.Response:
    return fresh("POST", "/v1/chat/completions", {**BODY, "steering": steering})


def generations() -> dict[str, float]:
    """pid -> the registry generation that API process serves (/metrics, answered by either process)."""
    text = fresh("GET", "/metrics").text
    family = next(
        f for f in text_string_to_metric_families(text) if f.name == "steer_runtime_catalog_generation"
    )
    return {s.labels["pid"]: s.value for s in family.samples}


Check = Callable[[requests.Response], None]


def in_both(generation: int, send: Callable[[], requests.Response], check: Check) -> list[requests.Response]:
    """send() and check() each answer until both API processes serve `generation` (at most 60 times: the
    kernel spreads new connections over the two processes unevenly); every answer."""
    answers = []
    for _ in range(60):
        answers.append(send())
        check(answers[-1])
        served = generations()
        assert len(served) == 2 and max(served.values()) == generation, served
        if set(served.values()) == {generation}:
            return answers
    pytest.fail(f"one API process never served generation {generation}: {served}")


def answered(status: int, param: str | None = None) -> Check:
    def check(answer: requests.Response) -> None:
        assert answer.status_code == status, answer.text
        assert param is None or answer.json()["error"]["param"] == param, answer.text

    return check


def test_two_api_processes_load_unload_and_steer_as_one(server, root, sae_layer):
    vec = load_file(str(root / "vec.safetensors"))["v"]
    twin_spec = {
        "features": [{"sae": "demo", "index": 100, "op": "clamp", "value": 60.0}],
        "vectors": [{"values": vec.tolist(), "layer": RUNTIME_LAYER, **VECTOR}],
    }
    twin = chat(twin_spec).json()["choices"][0]  # configured SAE + inline vector: no runtime load involved
    assert set(generations().values()) == {0.0}

    sae = {"id": "demo2", "path": str(root / "demo-copy")}
    loaded = fresh("POST", "/v1/steering/saes", sae, ADMIN)
    assert loaded.status_code == 201, loaded.text
    revision = loaded.json()["revision"]
    assert sorted(generations().values()) == [0.0, 1.0]  # the loading process only
    # The same id again, through both processes: the workers' registry refuses it whichever asks.
    in_both(1, lambda: fresh("POST", "/v1/steering/saes", sae, ADMIN), answered(409, "id"))

    vector = {"id": "rv", "path": str(root / "vec.safetensors"), "layer": RUNTIME_LAYER}
    assert fresh("POST", "/v1/steering/vectors", vector, ADMIN).status_code == 201
    runtime_spec = {
        "features": [{"sae": "demo2", "index": 100, "op": "clamp", "value": 60.0}],
        "vectors": [{"name": "rv", **VECTOR}],
    }

    def like_the_twin(answer: requests.Response) -> None:
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["logprobs"] == twin["logprobs"] and choice["message"] == twin["message"]
        applied = choice["steering"]["applied"]
        assert (applied[0]["sae"], applied[0]["layer"], applied[1]["vector"]) == ("demo2", sae_layer, "rv")

    # A process that has not read generation 2 does not know rv: it reads the registry, then plans again.
    in_both(2, lambda: chat(runtime_spec), like_the_twin)
    listings = [fresh("GET", "/v1/steering/saes").json() for _ in range(6)]
    assert all(listing == listings[0] for listing in listings)
    assert listings[0]["generation"] == 2
    assert {s["id"]: s["revision"] for s in listings[0]["data"]} == {"demo": None, "demo2": revision}
    assert [v["id"] for v in listings[0]["vectors"]] == ["unit", "rv"]

    gone = fresh("DELETE", "/v1/steering/saes/demo2", headers=ADMIN)
    assert gone.status_code == 200 and gone.json()["revision"] == revision, gone.text
    # A process whose copy still names demo2 reads the registry before resolving: both refuse it.
    in_both(3, lambda: chat(runtime_spec), answered(400, "steering.features[0].sae"))
    assert fresh("DELETE", "/v1/steering/vectors/rv", headers=ADMIN).status_code == 200
    answers = in_both(4, lambda: fresh("GET", "/v1/steering/saes"), answered(200))
    listings = [answer.json() for answer in answers]
    assert all(listing == listings[0] for listing in listings)
    assert listings[0]["generation"] == 4 and [s["id"] for s in listings[0]["data"]] == ["demo"]
    assert [v["id"] for v in listings[0]["vectors"]] == ["unit"]

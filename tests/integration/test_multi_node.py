"""Multi-node serving, for real, on one machine: two "hosts" (netns.py: two network namespaces on a veth pair,
10.77.0.1 and 10.77.0.2, each with private tmpfs /tmp and /dev/shm, no shared writable directory) running vLLM's
own multiprocessing multi-node launch: `steer-serve ... --nnodes 2 --node-rank 0 --master-addr 10.77.0.1` (the
API server) on host 0 and `steer-serve ... --nnodes 2 --node-rank 1 --headless` on host 1 (vLLM's headless worker
node). Across hosts the processes share no multiprocessing authkey, so both get the same STEER_PLUGIN_WIRE_KEY.

- PP=2 (the demo model, its 30 layers split 15/15: the SAE's layer 15 runs on host 1): the engine-fidelity
  steering cases equal the HF reference, an SAE loaded at runtime (files on each host's own /tmp) steers like the
  configured one, and `inspect` records reach the API on host 0.
- TP=2 (the tiny Llama of test_tensor_parallel: its heads split over the two hosts): steered and unsteered outputs
  equal a single-node TP=1 engine's, and a runtime load that one host refuses (its copy of the SAE has a NaN
  behind an intact header) is refused and rolled back on the other host, whose reserved rows are free again.

Needs root and `ip netns` (skipped otherwise; CI runs as root)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch

from .conftest import MAX_MODEL_LEN, PROMPTS, chat_ids
from .test_engine_fidelity import LOGPROB_TOL, TOP, cases

pytestmark = [pytest.mark.server, pytest.mark.netns]

OFFSET = int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))
PORT, MASTER_PORT = 18861 + OFFSET, 29561 + OFFSET
KEY = "multi-node-admin-key-0123456789abcdef"
ADMIN = {"X-Steer-Admin-Key": KEY}
START_TIMEOUT_S = 600


@contextmanager
def multi_node_server(hosts, node_dirs: list[Path], model: str, parallel: list[str], log_dir: Path):
    """steer-serve on two hosts (node 1 headless first, then node 0 with the API) until the API answers
    /health; yields a thread pool whose threads are on host 1 (the client's requests cross the veth)."""
    wire_key = secrets.token_hex(32)
    common = [
        "--steer-config", "/tmp/steer.json", "--model", model, "--served-model-name", "demo",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), *parallel,
        "--nnodes", "2", "--master-addr", hosts[0].addr, "--master-port", str(MASTER_PORT),
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "steer_adapters.vllm.api.launcher"]
    commands = [
        [*launcher, *common, "--node-rank", "0", "--host", hosts[0].addr, "--port", str(PORT)],
        [*launcher, *common, "--node-rank", "1", "--headless"],
    ]
    started = time.time()
    procs = []
    for rank in (1, 0):
        host = hosts[rank]
        env = {
            **os.environ,
            "HOME": "/tmp/home",
            "VLLM_HOST_IP": host.addr,  # vLLM's own guess asks for a route to the internet: there is none
            "GLOO_SOCKET_IFNAME": host.ifname,
            "VLLM_CPU_OMP_THREADS_BIND": str(rank),  # one core per host
            "STEER_PLUGIN_WIRE_KEY": wire_key,
            "STEER_PLUGIN_OBSERVE_HOST": hosts[0].addr,
            "STEER_ADMIN_KEY": KEY,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])
            ),
        }
        log = open(log_dir / f"node{rank}.log", "w")
        procs.append(host.start(commands[rank], node_dirs[rank], env, log))
    try:
        with hosts[1].session() as pool:
            deadline = time.time() + START_TIMEOUT_S
            while True:
                dead = [p.returncode for p in procs if p.poll() is not None]
                assert not dead, f"a node exited during start-up ({dead}); logs in {log_dir}"
                try:
                    health = pool.submit(requests.get, f"http://{hosts[0].addr}:{PORT}/health", timeout=2)
                    if health.result().status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.time() < deadline, f"no /health after {START_TIMEOUT_S} s; logs in {log_dir}"
                time.sleep(2)
            print(f"two-node server ({' '.join(parallel)}) healthy after {time.time() - started:.1f} s")
            yield pool
    finally:
        for host in hosts:
            host.stop()


def post(pool: ThreadPoolExecutor, hosts, path: str, body: dict, headers: dict | None = None):
    url = f"http://{hosts[0].addr}:{PORT}{path}"
    return pool.submit(requests.post, url, json=body, headers=headers, timeout=300).result()


def completions(pool, hosts, bodies: list[dict]) -> list[dict]:
    """The bodies sent at once (one batch on the engine), their answers in order."""
    futures = [
        pool.submit(
            requests.post,
            f"http://{hosts[0].addr}:{PORT}/v1/completions",
            json={"model": "demo", "temperature": 0, **b},
            timeout=300,
        )
        for b in bodies
    ]
    replies = [f.result() for f in futures]
    for reply in replies:
        assert reply.status_code == 200, reply.text
    return [r.json() for r in replies]


def first_token_logprobs(reply: dict) -> dict[int, float]:
    top = reply["choices"][0]["logprobs"]["top_logprobs"][0]  # {"token_id:123": logprob}
    return {int(token.split(":", 1)[1]): value for token, value in top.items()}


def node_dirs(tmp_path_factory, name: str, config: dict, files: dict[str, Path]) -> list[Path]:
    """Each host's /tmp: steer.json and copies of `files` (name -> file or folder), the same on both."""
    dirs = []
    for rank in (0, 1):
        folder = tmp_path_factory.mktemp(f"{name}-node{rank}")
        (folder / "steer.json").write_text(json.dumps(config))
        for target, source in files.items():
            (folder / target).parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, folder / target)
            else:
                shutil.copy(source, folder / target)
        dirs.append(folder)
    return dirs


# --- PP=2: the demo model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pp_server(hosts, demo_assets, steer_config_path, assets, sae_layer, tmp_path_factory):
    config = json.loads(open(steer_config_path).read())
    unit = Path(config["vectors"][0]["path"])
    config["vectors"][0]["path"] = "/tmp/unit.safetensors"  # the config's own files are on each host's /tmp
    config["runtime"] = {
        "layers": [sae_layer],
        "rows_per_layer": assets.saes["demo"].sae.d_sae + 4,
        "roots": ["/tmp/runtime"],
    }
    files = {"unit.safetensors": unit, "runtime/demo-copy": Path(demo_assets.sae_dir)}
    dirs = node_dirs(tmp_path_factory, "pp", config, files)
    log_dir = tmp_path_factory.mktemp("pp-logs")
    model = str(Path(demo_assets.model_dir).resolve())  # a read-only shared path: "installed on each host"
    with multi_node_server(hosts, dirs, model, ["--pipeline-parallel-size", "2"], log_dir) as pool:
        yield pool


@pytest.fixture(scope="module")
def prompt_ids(hf) -> list[int]:
    return chat_ids(hf.tokenizer, PROMPTS[0])


@pytest.fixture(scope="module")
def active(hf, assets, sae_layer, prompt_ids) -> list[tuple[int, float]]:
    x = hf.residual_after(sae_layer, prompt_ids)[-1]
    values, indices = torch.topk(assets.saes["demo"].sae.encode(x[None])[0], 4)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def first_token_body(ids: list[int], steering: dict | None) -> dict:
    return {
        "prompt": ids,
        "max_tokens": 1,
        "logprobs": TOP,
        "return_tokens_as_token_ids": True,
        **({"steering": steering} if steering else {}),
    }


def test_pp2_across_hosts_steers_like_the_reference(pp_server, hosts, hf, prompt_ids, active):
    started = time.time()
    named = cases(active)
    replies = completions(pp_server, hosts, [first_token_body(prompt_ids, s) for s in named.values()])
    plain = hf.next_token_logprobs(prompt_ids, None)
    errors = {}
    for (name, steering), reply in zip(named.items(), replies):
        got = first_token_logprobs(reply)
        want = hf.next_token_logprobs(prompt_ids, steering)
        tokens = torch.tensor(list(got))
        errors[name] = (torch.tensor(list(got.values())) - want[tokens]).abs().max().item()
        assert errors[name] < LOGPROB_TOL, f"{name}: two-node PP=2 vs HF reference: {errors[name]:.2e}"
        assert (want[tokens] - plain[tokens]).abs().max().item() > 20 * LOGPROB_TOL, name
    print("max |Δ logprob| per case: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print(f"PP=2 steering vs reference: {time.time() - started:.1f} s")


def test_pp2_runtime_sae_loaded_on_the_second_host_steers_like_the_configured_one(
    pp_server, hosts, prompt_ids
):
    loaded = post(
        pp_server, hosts, "/v1/steering/saes", {"id": "demo2", "path": "/tmp/runtime/demo-copy"}, ADMIN
    )
    assert loaded.status_code == 201, loaded.text

    def clamp(sae: str) -> dict:
        return {"features": [{"sae": sae, "index": 100, "op": "clamp", "value": 60.0}]}

    configured, runtime, plain = completions(
        pp_server,
        hosts,
        [first_token_body(prompt_ids, clamp(s)) for s in ("demo", "demo2")]
        + [first_token_body(prompt_ids, None)],
    )
    assert first_token_logprobs(configured) != first_token_logprobs(plain)
    assert first_token_logprobs(runtime) == pytest.approx(first_token_logprobs(configured), abs=1e-4)
    assert runtime["choices"][0]["steering"]["applied"][0]["sae"] == "demo2"


def test_pp2_inspect_records_reach_the_api_host(pp_server, hosts, hf, assets, sae_layer):
    """The SAE's layer runs on host 1; its records reach the API on host 0 over TCP (STEER_PLUGIN_OBSERVE_HOST:
    abstract IPC does not cross network namespaces) and equal the reference encode."""
    ids = chat_ids(hf.tokenizer, PROMPTS[1])
    body = {"prompt": ids, "max_tokens": 4, "return_token_ids": True, "steering": {"inspect": {"top_k": 5}}}
    (reply,) = completions(pp_server, hosts, [body])
    choice = reply["choices"][0]
    tokens = choice.get("steering", {}).get("tokens") or []
    generated = choice["token_ids"]
    assert len(tokens) == len(generated) == 4, choice.get("steering")
    assert all(t.get("demo") for t in tokens), tokens
    x = hf.residual_after(sae_layer, ids + generated[:-1])[len(ids) - 1 :]
    f = assets.saes["demo"].sae.encode(x)
    for k, record in enumerate(tokens):
        got = {d["index"]: d["activation"] for d in record["demo"]}
        values, indices = torch.topk(f[k], 5)
        want = {int(i): float(v) for i, v in zip(indices, values) if v > 0}
        assert max(want, key=want.get) in got
        for index in set(got) & set(want):
            assert abs(got[index] - want[index]) <= 1e-2 * max(1.0, want[index])

"""Real vLLM engines with the demo model and demo SAE, plus the HF transformers golden reference."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import requests
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# Tests send small worker-side functions through collective_rpc (pickled); never set this in production.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

VECTOR_LAYER = 8
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def demo_assets():
    from steer_demo.build_assets import ensure_assets

    return ensure_assets()


@pytest.fixture(scope="session")
def steer_config_path(demo_assets, tmp_path_factory) -> str:
    """The demo SAE, plus a fixed random unit vector at another layer; inline vectors allowed."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("steer-config")
    vec = torch.randn(576, generator=torch.Generator().manual_seed(0))
    save_file({"direction": vec / vec.norm()}, str(folder / "unit.safetensors"))
    config = {
        "saes": [{"id": "demo", "path": str(demo_assets.sae_dir)}],
        "vectors": [{"id": "unit", "path": str(folder / "unit.safetensors"), "layer": VECTOR_LAYER}],
        "policy": {"allow_inline_vectors": True},
    }
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    return str(path)


def write_monitored_config(base_config: str, folder, watched: int, denied: int, **policy) -> str:
    """The base config with the demo SAE monitored on all traffic (file sink in `folder`, top 4, `watched` on
    the watchlist above 1.0) and `denied` refused by policy (plus any other policy keys); its path."""
    config = json.loads(open(base_config).read())
    config["monitoring"] = {
        "saes": {"demo": {"sample_rate": 1.0}},
        "sink": "file",
        "path": str(folder / "monitor.jsonl"),
        "top_k": 4,
        "watchlist": [{"sae": "demo", "index": watched, "threshold": 1.0}],
    }
    config["policy"] = {"denied_features": [{"sae": "demo", "index": denied}], **policy}
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    return str(path)


def write_runtime_config(base_config: str, folder, layers: list[int], rows_per_layer: int, root) -> str:
    """The base config with runtime loads on: `layers` reserved with `rows_per_layer` rows each, files allowed
    under `root`; written in `folder`, its path."""
    config = json.loads(open(base_config).read())
    config["runtime"] = {"layers": layers, "rows_per_layer": rows_per_layer, "roots": [str(root)]}
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaced hosts (tests/integration/netns.py) for the multi-node tests."""
    from tests.tools import skip_or_fail

    from . import netns

    reason = netns.unavailable()
    if reason:
        skip_or_fail(f"multi-node tests need two namespaced hosts: {reason}")  # CI runs as root: fails there
    with netns.two_hosts() as pair:
        yield pair


def add_explanations(config_path: str, folder, files: dict[str, str]) -> None:
    """Writes `files` (name -> text) into `folder`/explanations and points the demo SAE's `explanations` at it."""
    target = folder / "explanations"
    target.mkdir(exist_ok=True)
    for name, text in files.items():
        (target / name).write_text(text)
    config = json.loads(open(config_path).read())
    config["saes"][0]["explanations"] = str(target)
    open(config_path, "w").write(json.dumps(config))


@pytest.fixture(scope="session")
def assets(steer_config_path):
    from steer_plugin.catalog import load_assets
    from steer_plugin.config import load_config_file

    return load_assets(load_config_file(steer_config_path))


@pytest.fixture(scope="session")
def sae_layer(assets) -> int:
    return assets.saes["demo"].layer


@pytest.fixture(scope="session")
def hf(demo_assets, assets):
    from steer_adapters.hf.reference import HFReference

    return HFReference(str(demo_assets.model_dir), assets, dtype=torch.float32)


def resolve(assets, steering: dict):
    """A `steering` JSON -> resolved ops (the API server's job)."""
    from steer_plugin.request.resolve import resolve_spec
    from steer_plugin.request.schema import parse_spec

    return resolve_spec(parse_spec(steering), assets.catalog())


def sampling(assets, steering: dict | None = None, **kwargs):
    from vllm import SamplingParams

    from steer_plugin.offline import steering_args

    # The offline one-liner (README "With plain vLLM"): parse, resolve, policy, sign.
    return SamplingParams(temperature=0.0, extra_args=steering_args(assets, steering) or None, **kwargs)


def make_llm(model_dir: str, config_path: str | None, enforce_eager: bool, plugins: bool = True, **kwargs):
    """An LLM whose engine core runs in its own process (so each test engine has its own plugin state)."""
    from vllm import LLM

    additional = {"steer_plugin": {"config_path": config_path}} if config_path else {}
    if config_path:  # the worker methods tests call by name (collective_rpc("steer_plugin_stats"))
        kwargs.setdefault("worker_extension_cls", "steer_adapters.vllm.worker.extension.SteerWorkerExtension")
    if plugins:
        # This process is the engines' first process (it signs the plans): register here even when an earlier
        # engine without plugins made vLLM mark its plugins loaded for the whole test process.
        from steer_adapters.vllm import plugin

        plugin.register()
    saved = os.environ.get("VLLM_PLUGINS")
    if not plugins:
        os.environ["VLLM_PLUGINS"] = ""  # an allowlist naming nothing: no general plugin loads
    try:
        return LLM(
            model=model_dir,
            dtype="float32",
            enforce_eager=enforce_eager,
            max_model_len=MAX_MODEL_LEN,
            seed=0,
            additional_config=additional,
            **kwargs,
        )
    finally:
        if saved is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = saved


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


@contextmanager
def engine(*args, **kwargs):
    llm = make_llm(*args, **kwargs)
    try:
        yield llm
    finally:
        shutdown(llm)


@contextmanager
def inprocess_engine(model_dir: str, config_path: str | None, enforce_eager: bool = True):
    """An LLM with the plugin whose engine core and worker run in this process."""
    import vllm.envs as envs

    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = make_llm(model_dir, config_path, enforce_eager, distributed_executor_backend="uni")
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
        # The in-process engine core froze vLLM's env lookups and the GC heap: undo both for later engines.
        envs.disable_envs_cache()
        gc.unfreeze()
    try:
        yield llm
    finally:
        shutdown(llm)
        gc.collect()


def token_prompt(ids: list[int]) -> dict:
    return {"prompt_token_ids": ids}


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


PROMPTS = [
    "Tell me about the Golden Gate Bridge in San Francisco.",
    "What is a good recipe for tomato soup?",
    "Explain how a rocket reaches orbit.",
    "Write a short poem about the ocean.",
    "How do I sort a list in Python?",
    "What causes thunderstorms?",
]


@pytest.fixture(scope="session")
def eager_llm(demo_assets, steer_config_path):
    with engine(str(demo_assets.model_dir), steer_config_path, enforce_eager=True) as llm:
        yield llm


@pytest.fixture(scope="session")
def compiled_llm(demo_assets, steer_config_path):
    """vLLM's default compile mode (on CPU: dynamo + inductor, no graphs)."""
    with engine(str(demo_assets.model_dir), steer_config_path, enforce_eager=False) as llm:
        yield llm


@pytest.fixture(scope="session")
def plain_llm(demo_assets):
    """The same engine with every vLLM plugin disabled."""
    with engine(str(demo_assets.model_dir), None, enforce_eager=True, plugins=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def prompt_ids(hf) -> list[int]:
    return chat_ids(hf.tokenizer, PROMPTS[0])


@contextmanager
def running_server(
    model_dir,
    config_path: str,
    port: int,
    *flags: str,
    env: dict | None = None,
    compiled: bool = False,
    log=None,
):
    """`steer-serve` on the demo model (fp32; eager unless `compiled`: vLLM's default compile mode) until it
    answers /health; stopped with SIGTERM after. `log`: a file the server's output goes to (else inherited)."""
    cmd = [
        sys.executable, "-m", "steer_adapters.vllm.api.launcher", "--steer-config", config_path,
        "--model", str(model_dir), "--served-model-name", "demo", "--dtype", "float32",
        *([] if compiled else ["--enforce-eager"]),
        "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(port), *flags,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, "server exited during start-up"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("server did not become healthy")
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

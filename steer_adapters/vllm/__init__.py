"""The vLLM adapter, by the process that runs each part:

- plugin.py: the `vllm.general_plugins` entry point (every vLLM process);
- api/: the API server (middleware, its view of the engine, the `steer-serve` launcher);
- engine_core.py: the engine core (the prefix-cache salt of steered requests);
- worker/: the workers (install, one module per model runner, the worker extension).

internals.py lists every vLLM internal these touch (tools/check_internals.py checks it against vLLM builds).
"""

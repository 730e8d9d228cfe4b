"""The vLLM adapter: a `vllm.general_plugins` entry point, the OpenAI server launcher and the worker glue."""

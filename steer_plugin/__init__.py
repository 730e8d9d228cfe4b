"""steer_plugin: per-request SAE feature steering and monitoring for LLM serving (server-agnostic core)."""

__version__ = "0.1.0"

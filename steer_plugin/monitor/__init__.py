"""Observing steered traffic: the worker-to-API-process transport (ZeroMQ), monitoring logs and metrics."""

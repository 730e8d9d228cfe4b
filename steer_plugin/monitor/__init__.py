"""Observing steered traffic: the worker-to-server side channel, monitoring logs and metrics."""

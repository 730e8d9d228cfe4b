"""Integrations of steer_plugin with inference servers (imported as `steer_adapters`)."""

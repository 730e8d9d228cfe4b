"""vLLM's authentication (`--api-key`) in front of the plugin's own routes."""

from __future__ import annotations


class AuthGate:
    """vLLM's own AuthenticationMiddleware (added for `--api-key` / VLLM_API_KEY), applied to the plugin's
    handlers. `--middleware` classes sit outside vLLM's authentication, so without this the plugin's routes
    would answer without a key and validate bodies before the 401."""

    def __init__(self):
        self._middleware = None
        self._resolved = False

    def wrap(self, app, handler):
        """`handler` behind the server's authentication, exactly as vLLM's routes are (or as is)."""
        if not self._resolved:
            self._middleware = next(
                (
                    m
                    for m in getattr(app, "user_middleware", ())
                    if getattr(m.cls, "__name__", "") == "AuthenticationMiddleware"
                ),
                None,
            )
            self._resolved = app is not None
        if self._middleware is None:
            return handler
        return self._middleware.cls(handler, *self._middleware.args, **self._middleware.kwargs)

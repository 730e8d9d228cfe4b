"""The playground: one static page (index.html, plain HTML/JS, no build step) that talks to the server's own API.

Chat with the model, search features by label, steer them (op, value slider, positions) and raw vectors, see the
steered and the default answer side by side while they stream, hover a token for its top features, trace one
feature's activation over the text as a heat map, and copy the exact request as curl or OpenAI-SDK code.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

ROUTE = "/playground"


@cache
def page() -> bytes:
    return files(__package__).joinpath("index.html").read_bytes()

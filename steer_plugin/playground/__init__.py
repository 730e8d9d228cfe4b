"""The playground: one static page (index.html, plain HTML/JS, no build step) that talks to the server's own API.

Chat with the model, search features by label, steer them (op, value slider, positions) and raw vectors, see the
steered and the default answer side by side while they stream, hover a token for its top features, trace one
feature's activation over the text as a heat map, paint a configured probe's per-token scores under each answer
with its per-answer summary, fit a probe or a vector from examples (the admin fit routes; the admin key held in the
page only) and copy the exact request as curl or OpenAI-SDK code.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

ROUTE = "/playground"


@cache
def page() -> bytes:
    return files(__package__).joinpath("index.html").read_bytes()


@cache
def content_security_policy() -> bytes:
    """The page's Content-Security-Policy: its one inline script (by hash) and nothing else runs; it talks to
    this server only; no other site may frame it (clickjacking), and no form or base URL leaves it. Inline
    styles are allowed (they cannot run code)."""
    scripts = re.findall(rb"<script>(.*?)</script>", page(), flags=re.DOTALL)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'" for body in scripts
    )
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ).encode()

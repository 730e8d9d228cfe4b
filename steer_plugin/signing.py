"""Signed messages from the API server to the engine: only the plugin's own middleware can steer.

Any client can put arbitrary `vllm_xargs` on any vLLM endpoint that builds SamplingParams (and future ones),
so the engine must not trust a steering or observation message just because it is there: it would bypass the
operator's policy and reach the workers unvalidated. Every message the plugin writes is signed with an HMAC
key shared by the processes of one server (inherited through the environment: the first process that loads
the plugin creates it); the engine core and the workers drop any message whose signature does not verify.

Multi-node deployments must give every host the same key (set STEER_PLUGIN_WIRE_KEY).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

KEY_ENV = "STEER_PLUGIN_WIRE_KEY"
_SIG_CHARS = 32  # hex characters of the truncated HMAC-SHA256 (128 bits)


class SignatureError(ValueError):
    """A message is unsigned, or its signature does not match this server's key."""


def wire_key() -> bytes:
    """This server's key; created (and exported to child processes) on first use."""
    key = os.environ.get(KEY_ENV)
    if not key:
        key = secrets.token_hex(32)
        os.environ[KEY_ENV] = key
    return key.encode()


def _mac(payload: str) -> str:
    return hmac.new(wire_key(), payload.encode(), hashlib.sha256).hexdigest()[:_SIG_CHARS]


def sign(payload: str) -> str:
    """`<signature>.<payload>`."""
    return f"{_mac(payload)}.{payload}"


def verify(message: object) -> str:
    """The payload of a signed message; SignatureError when it is not one of ours."""
    if not isinstance(message, str) or len(message) <= _SIG_CHARS or message[_SIG_CHARS] != ".":
        raise SignatureError("not a signed steer_plugin message")
    signature, payload = message[:_SIG_CHARS], message[_SIG_CHARS + 1 :]
    if not hmac.compare_digest(signature, _mac(payload)):
        raise SignatureError("bad signature on a steer_plugin message")
    return payload

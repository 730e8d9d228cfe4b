"""Signed messages from the API server to the engine: only the plugin's own middleware can steer.

Any client can put arbitrary `vllm_xargs` on any vLLM endpoint that builds SamplingParams (and future ones),
so the engine must not trust a steering or observation message just because it is there: it would bypass the
operator's policy and reach the workers unvalidated. Every message the plugin writes is signed with an HMAC
key shared by the processes of one server; the engine core and the workers drop any message whose signature does
not verify (request/wire.py also binds each plan to its request and a short window).

Where the key comes from, and who can read it (README "What a shared host can see"):
- By default it is derived from the `multiprocessing` authentication key of the server's process tree: a random
  key the first process makes at start (os.urandom) and that every process vLLM starts through
  `multiprocessing` (API servers, the engine core, the workers, with fork or spawn) inherits through
  multiprocessing's own channel, never through the environment or the command line. So it is new for every
  server life, and another process on the host (even of the same user) cannot read it from
  /proc/<pid>/environ or cmdline; only one that can read the server's memory (ptrace, root) can.
- STEER_PLUGIN_WIRE_KEY, when set, is the key instead: needed where processes do not descend from one another
  through multiprocessing (Ray workers, several hosts, external launchers). It is then in those processes'
  environment (readable by the same user on that host); plans still expire after a short window, and each is
  admitted once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import multiprocessing
import os

KEY_ENV = "STEER_PLUGIN_WIRE_KEY"
_SIG_CHARS = 32  # hex characters of the truncated HMAC-SHA256 (128 bits)
_DERIVATION = b"steer_plugin wire key v1"


class SignatureError(ValueError):
    """A message is unsigned, or its signature does not match this server's key."""


@functools.lru_cache(maxsize=4)
def _derived(authkey: bytes) -> bytes:
    return hmac.new(authkey, _DERIVATION, hashlib.sha256).digest()


def wire_key() -> bytes:
    """This server's key: STEER_PLUGIN_WIRE_KEY when set, else derived from the process tree's multiprocessing
    authentication key (see the module docstring). Nothing is written anywhere."""
    key = os.environ.get(KEY_ENV)
    if key:
        return key.encode()
    return _derived(bytes(multiprocessing.current_process().authkey))


def key_source() -> str:
    """Where the key in force comes from, for the start-up log line: `environment` or `process tree`."""
    return "environment" if os.environ.get(KEY_ENV) else "process tree"


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

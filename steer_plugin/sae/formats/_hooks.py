"""Hook-point names the formats use, mapped to "the residual stream after decoder layer L".

- TransformerLens `blocks.L.hook_resid_post` = output of decoder layer L (HF hidden_states[L+1]).
- TransformerLens `blocks.L.hook_resid_pre` = input of layer L = output of layer L-1 (none for L = 0: embeddings).
- HF `model.layers.L.output` / `model.layers.L` (Gemma Scope 2) and sparsify `layers.L` = output of layer L.
Anything else (MLP/attention outputs, hook_z, ...) is not a residual-stream read: layer stays None.
"""

from __future__ import annotations

import re

_RESID_POST = (
    re.compile(r"^blocks\.(\d+)\.hook_resid_post$"),
    re.compile(r"^(?:model\.)?layers\.(\d+)(?:\.output)?$"),
    re.compile(r"^model\.model\.layers\.(\d+)(?:\.output)?$"),
)
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


def layer_from_hook(hook_name: str | None) -> int | None:
    """Decoder layer whose output (residual stream after it) `hook_name` reads, or None."""
    if not hook_name:
        return None
    for pattern in _RESID_POST:
        match = pattern.match(hook_name)
        if match:
            return int(match.group(1))
    match = _RESID_PRE.match(hook_name)
    if match and int(match.group(1)) > 0:
        return int(match.group(1)) - 1
    return None


def resid_post_hook(layer: int) -> str:
    """TransformerLens name of the residual stream after decoder layer `layer`."""
    return f"blocks.{layer}.hook_resid_post"

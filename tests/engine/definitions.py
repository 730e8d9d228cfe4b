"""The steering operations as README "The API" defines them, one token and one operation at a time, float64:
what the engine's tests compare the batched op against. Requests are the user's `steering` JSON (op, value,
normalize, positions, when); features are named by `sae` + `index`. Only the SAE's own encode and decode are
used (the SAE, not the steering op), never the engine's coefficients."""

from __future__ import annotations

import copy

import torch

from steer_plugin.sae.model import SparseAutoencoder


def feature(sae: SparseAutoencoder, x: torch.Tensor, i: int) -> float:
    """f_i(x): the SAE's encode; under TopK relu(pre_i) (README: "Clamp under TopK")."""
    x = x.to(sae.dtype)
    if sae.architecture == "topk":
        x_n, _ = sae.normalise(x[None])
        return float(torch.relu(sae.pre_activations(x_n)[0, i]))
    return float(sae.encode(x[None])[0, i])


def with_feature(sae: SparseAutoencoder, x: torch.Tensor, i: int, target: float) -> torch.Tensor:
    """x with f_i set to `target` in the SAE's code, the reconstruction error x - decode(f) kept."""
    _, state = sae.normalise(x[None])
    f = sae.encode(x[None])  # [1, d_sae]
    f[0, i] = feature(sae, x, i)
    f_set = f.clone()
    f_set[0, i] = target
    return (sae.decode(f_set, state) + x[None] - sae.decode(f, state))[0]


def in_positions(positions, t: int, prompt_len: int) -> bool:
    """`positions` of an op: `generation` is every position >= the prompt length."""
    if positions == "all":
        return True
    if positions == "prompt":
        return t < prompt_len
    if positions == "generation":
        return t >= prompt_len
    return prompt_len - positions["last_prompt_tokens"] <= t < prompt_len


def applies(op: dict, saes: dict[str, SparseAutoencoder], x: torch.Tensor, t: int, prompt_len: int) -> bool:
    """The op's `positions` include token t, and its `when` holds on x (read before any op)."""
    if not in_positions(op.get("positions", "all"), t, prompt_len):
        return False
    when = op.get("when")
    if when is None:
        return True
    f = feature(saes[when["sae"]], x, when["index"])
    return f > when["above"] if "above" in when else f < when["below"]


def written_out(
    request: dict,
    saes: dict[str, SparseAutoencoder],
    vectors: dict[str, torch.Tensor],
    x: torch.Tensor,
    pos,
    prompt_len,
) -> torch.Tensor:
    """The change `request` makes to each token's residual x [n, d] at one layer (float64): per token, the sum
    over the operations that apply there of x'_op - x, every operation reading the same x. pos / prompt_len:
    each token's position and its request's prompt length ([n] or ints)."""
    saes = {k: copy.copy(s).to(dtype=torch.float64) for k, s in saes.items()}
    out = torch.zeros(x.shape, dtype=torch.float64)
    n = len(x)
    pos = [int(p) for p in pos] if not isinstance(pos, int) else [pos] * n
    prompt_len = [int(p) for p in prompt_len] if not isinstance(prompt_len, int) else [prompt_len] * n
    for t, row in enumerate(x.double()):
        for op in request.get("features", []):
            if not applies(op, saes, row, pos[t], prompt_len[t]):
                continue
            sae, i, v = saes[op["sae"]], op["index"], op.get("value", 0.0)
            if op["op"] == "add" and op.get("normalize"):
                w = sae.W_dec[i]
                out[t] += v * row.norm() * w / w.norm()
                continue
            f = feature(sae, row, i)
            # add: v more of feature i (x + v·W_dec[i], through the SAE's decoder); the others set f_i.
            target = {"add": f + v, "clamp": v, "scale": v * f, "ablate": 0.0}[op["op"]]
            out[t] += with_feature(sae, row, i, target) - row
        for op in request.get("vectors", []):
            if not applies(op, saes, row, pos[t], prompt_len[t]):
                continue
            vec = vectors[op["name"]] if "name" in op else torch.tensor(op["values"], dtype=torch.float32)
            vec, s = vec.double(), op.get("scale", 1.0)
            out[t] += s * row.norm() * vec / vec.norm() if op.get("normalize") else s * vec
    return out

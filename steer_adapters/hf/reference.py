"""Hugging Face transformers reference adapter: the golden reference the tests compare vLLM against.

It reads the request's `steering` as the user wrote it (op, value, normalize, positions, when) and applies it
with a forward hook on the HF decoder layer, one token and one operation at a time, straight from the
definitions in README "The API":
    add     f_i ← f_i + v in the SAE's code, decoded (x + v·W_dec[i]); normalize: x + v·|x|·W_dec[i]/|W_dec[i]|
    clamp   f_i ← v        keeping the SAE's reconstruction error: x' = decode(f with f_i = v) + (x - decode(f))
    scale   f_i ← v·f_i    (same, with the target v·f_i)
    ablate  f_i ← 0        (same, with the target 0)
    vector  x + s·vector;  normalize: x + s·|x|·vector/|vector|
f is the SAE's own encode (`SparseAutoencoder`); under TopK f_i is read as relu(pre_i) (README: top-k
membership needs the full encode). Every operation at a layer reads the same unsteered x (its `when` too), and
their changes add up. The arithmetic is float64, so the reference's own rounding is far below the engine's.
It shares nothing with the engine's op (no coefficients, no bank, no batching); only feature *names* are
resolved through the spec's lookup (`resolve_feature`), as the server does.
Slow by design: no KV cache, the whole sequence is recomputed each step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch

from steer_plugin.catalog import LoadedAssets
from steer_plugin.request.resolve import resolve_feature
from steer_plugin.request.schema import Condition, LastPromptTokens, inline_vector, parse_spec
from steer_plugin.sae.model import SparseAutoencoder

Steering = dict | None  # the request's `steering` JSON object (or a parsed SteeringSpec)


class When(NamedTuple):
    """A `when` condition: feature `index` of `sae`, above or below a threshold."""

    sae: SparseAutoencoder
    index: int
    above: float | None
    below: float | None

    def holds(self, x: torch.Tensor) -> bool:
        f = feature_value(self.sae, x, self.index)
        return f > self.above if self.above is not None else f < self.below


class RefOp(NamedTuple):
    """One operation of a request, as the request states it, at its layer."""

    layer: int
    op: str  # add, clamp, scale, ablate or vector
    value: float  # add: v; clamp: the target; scale: the factor; vector: the scale; ablate: unused
    normalize: bool
    positions: str  # all, prompt, generation or last_prompt_tokens
    last_n: int  # last_prompt_tokens: N
    sae: SparseAutoencoder | None  # feature ops
    index: int  # feature ops
    vector: torch.Tensor | None  # vector ops, [d]
    when: When | None


def feature_value(sae: SparseAutoencoder, x: torch.Tensor, index: int) -> float:
    """f_i(x) for one token x [d]: the SAE's encode; under TopK relu(pre_i) (documented)."""
    x = x.to(sae.dtype)[None]  # [1, d]
    if sae.architecture == "topk":
        x_n, _ = sae.normalise(x)
        return float(torch.relu(sae.pre_activations(x_n)[0, index]))
    return float(sae.encode(x)[0, index])


def _positions(p: str | LastPromptTokens) -> tuple[str, int]:
    if isinstance(p, LastPromptTokens):
        return "last_prompt_tokens", p.last_prompt_tokens
    return p, 0


def request_ops(
    steering: Steering, assets: LoadedAssets, saes: Mapping[str, SparseAutoencoder] | None = None
) -> list[RefOp]:
    """The request's operations, features looked up by name in `assets` (SAEs taken from `saes` when given)."""
    if not steering:
        return []
    spec, catalog = parse_spec(steering), assets.catalog()
    saes = saes if saes is not None else {k: v.sae for k, v in assets.saes.items()}

    def when(cond: Condition | None, path: str) -> When | None:
        if cond is None:
            return None
        info, index = resolve_feature(cond, catalog, f"{path}.when")
        return When(saes[info.id], index, cond.above, cond.below)

    ops = []
    for i, op in enumerate(spec.features):
        path = f"steering.features[{i}]"
        info, index = resolve_feature(op, catalog, path)
        value = 0.0 if op.value is None else op.value
        ops.append(
            RefOp(info.layer, op.op, value, op.normalize, *_positions(op.positions), saes[info.id], index, None,
                  when(op.when, path))
        )  # fmt: skip
    for i, op in enumerate(spec.vectors):
        path = f"steering.vectors[{i}]"
        if op.inline:
            layer, vec = op.layer, torch.from_numpy(inline_vector(op, path).copy())
        else:
            layer, vec = assets.vectors[op.name].layer, assets.vectors[op.name].vector
        ops.append(
            RefOp(layer, "vector", op.scale, op.normalize, *_positions(op.positions), None, 0, vec,
                  when(op.when, path))
        )  # fmt: skip
    return ops


def op_applies(op: RefOp, position: int, prompt_len: int) -> bool:
    """`positions`: generation means positions >= the prompt length."""
    in_prompt = position < prompt_len
    if op.positions == "all":
        return True
    if op.positions == "prompt":
        return in_prompt
    if op.positions == "generation":
        return not in_prompt
    assert op.positions == "last_prompt_tokens", op.positions
    return in_prompt and position >= prompt_len - op.last_n


def op_change(op: RefOp, x: torch.Tensor) -> torch.Tensor:
    """What one operation does to one token's residual x [d] (float64): x' - x, [d]."""
    if op.op == "vector":
        vec = op.vector.to(x)
        return op.value * x.norm() * vec / vec.norm() if op.normalize else op.value * vec
    sae = op.sae
    if op.op == "add" and op.normalize:
        w = sae.W_dec[op.index].to(x)  # [d]
        return op.value * x.norm() * w / w.norm()
    xs = x.to(sae.dtype)[None]  # [1, d]
    _, state = sae.normalise(xs)
    f = sae.encode(xs)  # [1, d_sae]
    f_i = feature_value(sae, x, op.index)
    f[0, op.index] = f_i
    target = {"add": f_i + op.value, "clamp": op.value, "scale": op.value * f_i, "ablate": 0.0}[op.op]
    f_set = f.clone()
    f_set[0, op.index] = target
    error = xs - sae.decode(f, state)  # the SAE's reconstruction error, kept
    return (sae.decode(f_set, state) + error - xs)[0].to(x)


def token_change(x: torch.Tensor, ops: list[RefOp], position: int, prompt_len: int) -> torch.Tensor:
    """Sum of every applicable op's change to one token's residual x [d] (all ops read the same x), float64."""
    x = x.double()
    total = torch.zeros_like(x)
    for op in ops:
        if op_applies(op, position, prompt_len) and (op.when is None or op.when.holds(x)):
            total += op_change(op, x)
    return total


class HFReference:
    """A transformers causal LM with reference steering at the layers the request names."""

    def __init__(self, model_dir: str, assets: LoadedAssets, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Eager attention: the definition. transformers' default (SDPA) silently drops Gemma 2's attention-logit
        # soft-capping (|Δ logprob| ~5e-2 on a tiny Gemma 2, where vLLM, which applies it, matches eager to 1e-5).
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager"
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.assets = assets
        # float64 copies for the steering arithmetic (the shared assets keep their dtype).
        self.saes = {k: copy.copy(v.sae).to(dtype=torch.float64) for k, v in assets.saes.items()}
        self.captured: dict[int, torch.Tensor] = {}

    @contextmanager
    def steering(self, steering: Steering, prompt_len: int):
        """Hooks that steer every layer the request names; also capture each steered layer's output."""
        ops = request_ops(steering, self.assets, self.saes)
        handles = []
        for layer in sorted({op.layer for op in ops}):
            layer_ops = [op for op in ops if op.layer == layer]

            def hook(module, args, output, layer=layer, layer_ops=layer_ops):
                hidden = output[0] if isinstance(output, tuple) else output  # [1, T, d]
                steered = hidden.clone()
                for t in range(hidden.shape[1]):
                    change = token_change(hidden[0, t], layer_ops, t, prompt_len)  # [d] float64
                    steered[0, t] = (hidden[0, t].double() + change).to(hidden.dtype)
                self.captured[layer] = steered[0].detach()
                return (steered, *output[1:]) if isinstance(output, tuple) else steered

            handles.append(self.model.model.layers[layer].register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def next_token_logprobs(
        self, token_ids: list[int], steering: Steering, prompt_len: int | None = None
    ) -> torch.Tensor:
        """Log-probabilities [vocab] of the token after `token_ids`, with the request's steering applied."""
        prompt_len = len(token_ids) if prompt_len is None else prompt_len
        with self.steering(steering, prompt_len):
            logits = self.model(torch.tensor([token_ids])).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], steering: Steering, max_new_tokens: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            ids.append(int(self.next_token_logprobs(ids, steering, len(prompt_ids)).argmax()))
            if ids[-1] == self.tokenizer.eos_token_id:
                break
        return ids[len(prompt_ids) :]

    @torch.no_grad()
    def residual_after(self, layer: int, token_ids: list[int]) -> torch.Tensor:
        """Unsteered residual stream after decoder layer `layer`, [T, d] (HF hidden_states[layer + 1])."""
        out = self.model(torch.tensor([token_ids]), output_hidden_states=True)
        return out.hidden_states[layer + 1][0].float()

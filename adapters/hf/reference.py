"""Hugging Face transformers reference adapter: the golden reference the tests compare vLLM against.

It applies steering with a forward hook on the HF decoder layer, written out op by op from the definitions
(full SAE encode through `SparseAutoencoder`, one token at a time), sharing no math with the engine's op.
Slow by design: no KV cache, the whole sequence is recomputed each step.
"""

from __future__ import annotations

import base64
from contextlib import contextmanager

import numpy as np
import torch

from steer_plugin.catalog import LoadedAssets
from steer_plugin.request.wire import POSITION_CODES, ResolvedOp
from steer_plugin.sae.model import SparseAutoencoder


def op_applies(op: ResolvedOp, position: int, prompt_len: int) -> bool:
    in_prompt = position < prompt_len
    if op.positions == POSITION_CODES["all"]:
        return True
    if op.positions == POSITION_CODES["prompt"]:
        return in_prompt
    if op.positions == POSITION_CODES["generation"]:
        return not in_prompt
    return in_prompt and position >= prompt_len - op.last_n


def feature_value(sae: SparseAutoencoder, x: torch.Tensor, index: int) -> tuple[float, float]:
    """(f_i(x), per-token decode scale) for one token x [d]. Under topk, f_i is relu(pre_i) (documented)."""
    x_n, state = sae.normalise(x[None])
    pre = sae.pre_activations(x_n)[0]  # [d_sae]
    if sae.architecture == "topk":
        f = torch.relu(pre[index])
    else:
        f = sae.activate(pre[None], x_n)[0, index]
    scale = 1.0 if state.scale is None else float(state.scale[0, 0])
    return float(f), scale


def condition_holds(op: ResolvedOp, x: torch.Tensor, assets: LoadedAssets) -> bool:
    """`when`: the condition feature's activation on the same (unsteered) x, above or below its threshold."""
    if op.cond_sign == 0:
        return True
    f, _ = feature_value(assets.saes[op.cond_source].sae, x, op.cond_index)
    return f > op.cond_threshold if op.cond_sign > 0 else f < op.cond_threshold


def token_delta(
    x: torch.Tensor, ops: list[ResolvedOp], assets: LoadedAssets, position: int, prompt_len: int
) -> torch.Tensor:
    """Sum of every applicable op's change to one token's residual x [d] (all ops read the same x)."""
    delta = torch.zeros_like(x)
    for op in ops:
        if not op_applies(op, position, prompt_len) or not condition_holds(op, x, assets):
            continue
        if op.kind in ("vector", "inline"):
            if op.kind == "inline":
                vec = torch.from_numpy(np.frombuffer(base64.b64decode(op.vector), dtype="<f4").copy()).to(x)
            else:
                vec = assets.vectors[op.source].vector.to(x)
            delta += op.b * vec + op.bn * x.norm() * vec / vec.norm()
            continue
        sae = assets.saes[op.source].sae
        w = sae.W_dec[op.index].to(x)  # [d]
        f, token_scale = feature_value(sae, x, op.index)
        direction = w * sae.out_scale * token_scale
        delta += (op.a * f + op.b) * direction + op.bn * x.norm() * w / w.norm()
    return delta


class HFReference:
    """A transformers causal LM with reference steering at the configured layers."""

    def __init__(self, model_dir: str, assets: LoadedAssets, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Eager attention: the definition. transformers' default (SDPA) silently drops Gemma 2's attention-logit
        # soft-capping (|Δ logprob| ~5e-2 on a tiny Gemma 2, where vLLM, which applies it, matches eager to 1e-5).
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager"
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.assets = assets
        for loaded in assets.saes.values():
            loaded.sae.to(dtype=dtype)
        self.captured: dict[int, torch.Tensor] = {}

    @contextmanager
    def steering(self, ops: list[ResolvedOp], prompt_len: int):
        """Hooks that steer every layer named by `ops`; also capture each steered layer's output."""
        handles = []
        for layer in sorted({op.layer for op in ops}):
            layer_ops = [op for op in ops if op.layer == layer]

            def hook(module, args, output, layer=layer, layer_ops=layer_ops):
                hidden = output[0] if isinstance(output, tuple) else output  # [1, T, d]
                steered = hidden.clone()
                for t in range(hidden.shape[1]):
                    steered[0, t] += token_delta(hidden[0, t], layer_ops, self.assets, t, prompt_len)
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
        self, token_ids: list[int], ops: list[ResolvedOp], prompt_len: int | None = None
    ) -> torch.Tensor:
        """Log-probabilities [vocab] of the token after `token_ids`, with steering applied."""
        prompt_len = len(token_ids) if prompt_len is None else prompt_len
        with self.steering(ops, prompt_len):
            logits = self.model(torch.tensor([token_ids])).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], ops: list[ResolvedOp], max_new_tokens: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            ids.append(int(self.next_token_logprobs(ids, ops, len(prompt_ids)).argmax()))
            if ids[-1] == self.tokenizer.eos_token_id:
                break
        return ids[len(prompt_ids) :]

    @torch.no_grad()
    def residual_after(self, layer: int, token_ids: list[int]) -> torch.Tensor:
        """Unsteered residual stream after decoder layer `layer`, [T, d] (HF hidden_states[layer + 1])."""
        out = self.model(torch.tensor([token_ids]), output_hidden_states=True)
        return out.hidden_states[layer + 1][0].float()

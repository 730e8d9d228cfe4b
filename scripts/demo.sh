#!/usr/bin/env bash
# The main job on the embedded default: install, build the demo assets, start the server with the plugin,
# send the same chat unsteered and steered, print both, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"

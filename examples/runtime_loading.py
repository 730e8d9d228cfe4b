"""Load an SAE into a running server, steer with it, unload it (`STEER_ADMIN_KEY=... steer-serve-demo`).

The demo config reserves room for one more SAE at the demo SAE's layer and allows loads from the demo assets'
folder. This loads the demo SAE a second time under another id, clamps the concept feature through both (the
answers are the same: the runtime copy steers exactly like the configured one), then unloads it.

    export STEER_ADMIN_KEY=$(python -c "import secrets; print(secrets.token_hex(24))")
    steer-serve-demo &
    python examples/runtime_loading.py [--base http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import os

import requests


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    from steer_demo.build_assets import ensure_assets
    from steer_demo.concept import concept_feature

    paths = ensure_assets()
    concept = concept_feature(paths)
    admin = {"X-Steer-Admin-Key": os.environ["STEER_ADMIN_KEY"]}

    loaded = requests.post(
        f"{args.base}/v1/steering/saes",
        json={"id": "demo-live", "path": str(paths.sae_dir), "labels": str(paths.labels_path)},
        headers=admin,
        timeout=300,
    )
    loaded.raise_for_status()
    info = loaded.json()
    print(f"loaded demo-live: layer {info['layer']}, {info['d_sae']} features, revision {info['revision']}")

    question = [{"role": "user", "content": "What should I see on a weekend trip? Answer in two sentences."}]
    for sae in ("demo", "demo-live"):
        reply = requests.post(
            f"{args.base}/v1/chat/completions",
            json={
                "model": "demo",
                "messages": question,
                "max_tokens": 40,
                "temperature": 0,
                "steering": {
                    "features": [{"sae": sae, "index": concept.index, "op": "clamp", "value": 30.0}]
                },
            },
            timeout=300,
        )
        reply.raise_for_status()
        print(
            f"[{sae} #{concept.index} '{concept.label}' clamped] {reply.json()['choices'][0]['message']['content']!r}"
        )

    gone = requests.delete(f"{args.base}/v1/steering/saes/demo-live", headers=admin, timeout=300)
    gone.raise_for_status()
    print("unloaded demo-live:", gone.json())


if __name__ == "__main__":
    main()

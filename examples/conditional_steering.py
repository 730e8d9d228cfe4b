"""Inline vectors, conditional operations and abort_when against a running demo server (`steer-serve-demo`).

1. abort_when: ask about the Golden Gate Bridge and stop the answer as soon as the model's residual reads the
   bridge concept above a threshold (finish_reason "abort_when", and which feature fired at which token).
2. when: "where the bridge feature is above 1, clamp it to 0": the feature is held at 0 on exactly those tokens
   (the text can still name bridges through other features: one latent is not the whole concept).
3. An inline vector: the concept feature's own decoder row, read from the local SAE file and sent in the request
   (as base64 float32), added only where the concept is *not* already active.

    python examples/conditional_steering.py [--base http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import base64

import numpy as np
import openai
import requests


def concept_and_row(base: str) -> tuple[int, int, np.ndarray]:
    """(concept feature index, its layer, its decoder row) of the demo SAE, from the local assets."""
    from steer_demo.build_assets import ensure_assets
    from steer_demo.concept import concept_feature
    from steer_plugin.sae import load_sae

    paths = ensure_assets()
    index = concept_feature(paths).index
    sae = load_sae(str(paths.sae_dir))  # any published format: the plugin's own loaders
    layer = next(s["layer"] for s in requests.get(f"{base}/v1/steering/saes", timeout=30).json()["data"])
    return index, layer, sae.W_dec[index].float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.base}/v1", api_key="none")
    model = client.models.list().data[0].id
    concept, layer, row = concept_and_row(args.base)
    feature = {"sae": "demo", "index": concept}

    def chat(question: str, steering: dict | None, max_tokens: int = 60):
        extra = {"steering": steering} if steering else None
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body=extra,
        )
        return reply.choices[0]

    bridge = "Tell me about the Golden Gate Bridge."
    print("== abort_when: stop when the bridge concept becomes active ==")
    print("plain:  ", chat(bridge, None).message.content)
    stopped = chat(bridge, {"abort_when": [{**feature, "above": 2.0}]})
    info = stopped.model_dump()["steering"].get("abort")
    print("stopped:", stopped.message.content)
    print("         finish_reason:", stopped.finish_reason, "| fired:", info)

    print("\n== when: clamp the bridge feature to 0 wherever it is above 1 ==")
    suppress = {"features": [{**feature, "op": "clamp", "value": 0.0, "when": {**feature, "above": 1.0}}]}
    print("steered:", chat(bridge, suppress).message.content)

    print("\n== an inline vector: the concept's decoder row, added where the concept is not active ==")
    vector = {
        "base64": base64.b64encode(row.astype("<f4").tobytes()).decode(),
        "layer": layer,
        "scale": 45.0,
        "when": {**feature, "below": 1.0},
    }
    weekend = "What should I see on a weekend trip? Answer in two sentences."
    print("plain:  ", chat(weekend, None).message.content)
    print("steered:", chat(weekend, {"vectors": [vector]}).message.content)


if __name__ == "__main__":
    main()

"""Golden-Gate-style demo against a running server (`steer-serve-demo`, or scripts/demo.sh).

1. Find the concept feature by inspecting text: the feature that fires most on the concept text and least on
   a neutral control text.
2. Clamp it on every token of an unrelated chat, with the official OpenAI SDK, and compare with the plain answer.

    python examples/golden_gate.py [--base http://127.0.0.1:8000] [--multiplier 6]
"""

from __future__ import annotations

import argparse

import openai
import requests

CONCEPT = "The Golden Gate Bridge is a suspension bridge over the strait into San Francisco Bay."
CONTROL = "My grandmother baked bread every Sunday and we ate it with butter and jam."
QUESTION = "What is your favourite thing to do on a Saturday?"


def feature_maxima(base: str, text: str) -> dict[tuple[str, int], float]:
    reply = requests.post(f"{base}/v1/steering/inspect", json={"text": text, "top_k": 10}, timeout=120)
    reply.raise_for_status()
    best: dict[tuple[str, int], float] = {}
    for token in reply.json()["data"][1:]:  # skip the first position (attention sink)
        for sae, features in token["features"].items():
            for f in features:
                key = (sae, f["index"])
                best[key] = max(best.get(key, 0.0), f["activation"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--multiplier", type=float, default=6.0, help="clamp value = multiplier x max activation"
    )
    args = parser.parse_args()

    concept, control = feature_maxima(args.base, CONCEPT), feature_maxima(args.base, CONTROL)
    (sae, index), peak = max(concept.items(), key=lambda kv: kv[1] - control.get(kv[0], 0.0))
    labels = requests.get(
        f"{args.base}/v1/steering/features", params={"sae": sae, "limit": 1000, "q": ""}, timeout=30
    ).json()
    label = next((h["label"] for h in labels["data"] if h["index"] == index), None)
    print(f"concept feature: {sae}/{index} (label {label!r}), max activation {peak:.2f} on the concept text")

    client = openai.OpenAI(base_url=f"{args.base}/v1", api_key="none")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=60, temperature=0)
    steering = {"features": [{"sae": sae, "index": index, "op": "clamp", "value": args.multiplier * peak}]}
    steered = client.chat.completions.create(
        model=model, messages=messages, max_tokens=60, temperature=0, extra_body={"steering": steering}
    )
    print(f"\nQ: {QUESTION}\n\nunsteered:\n{plain.choices[0].message.content}\n")
    print(f"clamped {sae}/{index} = {args.multiplier * peak:.1f}:\n{steered.choices[0].message.content}")


if __name__ == "__main__":
    main()

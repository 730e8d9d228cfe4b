"""Probes example: fit a probe from labelled texts on the running server, then read its score on every generated
token and stop an answer when it crosses a threshold. Start a server whose config reserves a layer for runtime
loads and names a root for the fitted files, with an admin key, e.g.

    {"saes": [{"id": "demo", "path": "assets/sae/smollm2-135m-res-l15-topk"}],
     "runtime": {"layers": [15], "rows_per_layer": 4096, "roots": ["fitted"]}}

    STEER_ADMIN_KEY=change-me-0123456789 steer-serve --steer-config that.json --model assets/SmolLM2-135M-Instruct
    python examples/probes.py --admin-key change-me-0123456789

(docs/probes.md has the file format, monitoring rules and the judge cascade.)
"""

from __future__ import annotations

import argparse

import requests

ABOUT = [  # one concept against the rest: the probe learns "is this about bridges?"
    "Tell me about the Golden Gate Bridge.",
    "How does a suspension bridge carry its load?",
    "What is the longest bridge in the world?",
    "Describe the Brooklyn Bridge at night.",
    "Why do bridges have expansion joints?",
    "Which bridge crosses the Bosphorus?",
]
OTHERS = [
    "How do I bake sourdough bread?",
    "Explain the rules of basketball.",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Give me three tips for learning a language.",
    "Describe the life cycle of a butterfly.",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    admin = {"X-Steer-Admin-Key": args.admin_key}

    examples = [{"text": t, "label": "bridges"} for t in ABOUT] + [
        {"text": t, "label": "other"} for t in OTHERS
    ]
    body = {"id": "bridges", "layer": args.layer, "examples": examples, "labels": ["other", "bridges"]}
    fit = requests.post(f"{args.base}/v1/steering/probes:fit", json=body, headers=admin, timeout=600)
    print("fit:", fit.status_code, fit.json())

    chat = {
        "model": requests.get(f"{args.base}/v1/models", timeout=30).json()["data"][0]["id"],
        "messages": [{"role": "user", "content": "Tell me about a famous bridge."}],
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": True,
        "steering": {"inspect": {"saes": [], "probes": ["bridges"]}},
    }
    choice = requests.post(f"{args.base}/v1/chat/completions", json=chat, timeout=300).json()["choices"][0]
    for token, scores in zip(choice["logprobs"]["content"], choice["steering"]["probes"]):
        print(f"{scores['bridges']['bridges']:6.3f} {token['token']!r}")
    print("summary:", choice["steering"]["probe_summary"])

    chat["steering"] = {"abort_when": [{"probe": "bridges", "above": 0.9}]}
    stopped = requests.post(f"{args.base}/v1/chat/completions", json=chat, timeout=300).json()["choices"][0]
    print("with abort_when:", stopped["finish_reason"], stopped["steering"].get("abort"))


if __name__ == "__main__":
    main()

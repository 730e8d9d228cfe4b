"""Monitoring example against a running server started with a config that has a `monitoring` section, e.g.

    {"saes": [{"id": "demo", "path": "assets/sae/smollm2-135m-res-l15-topk"}],
     "monitoring": {"saes": {"demo": {"sample_rate": 1.0}}, "sink": "file", "path": "monitor.jsonl",
                    "watchlist": [{"sae": "demo", "index": 123, "threshold": 2.0}]}}

    steer-serve --steer-config that.json --model assets/SmolLM2-135M-Instruct --enforce-eager
    python examples/monitoring.py --log monitor.jsonl

It sends a little traffic, prints the structured log lines the plugin wrote for it, and the steering metrics
on the server's /metrics.
"""

from __future__ import annotations

import argparse
import json
import time

import openai
import requests

PROMPTS = ["Plan a trip to San Francisco.", "How do suspension bridges work?", "Give me a soup recipe."]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument("--log", required=True, help="the monitoring.path of the server's config")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=f"{args.base}/v1", api_key="none")
    model = client.models.list().data[0].id
    ids = set()
    for prompt in PROMPTS:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24
        )
        ids.add(reply.id)
    time.sleep(0.5)
    print("monitoring log lines for this traffic:")
    with open(args.log) as f:
        for line in f:
            record = json.loads(line)
            if record["request_id"] in ids:
                top = ", ".join(
                    f"{t['index']}:{t['label']}({t['max_activation']:.1f})" for t in record["top_features"]
                )
                print(
                    f"  {record['request_id']} {record['sae']} tokens={record['num_tokens']} top=[{top}] watch={record['watchlist']}"
                )
    print("\nsteering metrics:")
    for line in requests.get(f"{args.base}/metrics", timeout=30).text.splitlines():
        if line.startswith("steer_") and not line.startswith(
            ("steer_active_features_bucket", "steer_reconstruction_error_bucket")
        ):
            print("  " + line)


if __name__ == "__main__":
    main()

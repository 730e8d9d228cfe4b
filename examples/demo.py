"""The README's main job: start the demo server with the plugin, send the same chat unsteered and steered.

    python examples/demo.py [--concept bridge] [--value 40] [--port 8077] [--compile]

It builds the demo assets when missing (steer-serve --demo does), starts the server on loopback, finds the
SAE feature whose label matches the concept, clamps it on every token, and prints both answers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import requests

DEFAULT_QUESTION = "What should I see on a weekend trip? Answer in two sentences."


def wait_for_health(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    started = time.time()
    while time.time() - started < timeout_s:
        if server.poll() is not None:
            sys.exit(f"demo: the server exited with code {server.returncode} (see the log above)")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                print(f"demo: server ready after {time.time() - started:.0f}s", flush=True)
                return
        except requests.ConnectionError:
            pass
        time.sleep(2)
    sys.exit(f"demo: server not ready after {timeout_s:.0f}s")


def chat(base: str, model: str, question: str, steering: dict | None, max_tokens: int) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if steering:
        body["steering"] = steering
    reply = requests.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concept", default="bridge", help="label text of the feature to clamp")
    parser.add_argument(
        "--value", type=float, default=None, help="clamp value (default: 8x the feature's max)"
    )
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--compile", action="store_true", help="vLLM's default compile mode (slower start)")
    args = parser.parse_args()

    base = f"http://127.0.0.1:{args.port}"
    cmd = [
        sys.executable,
        "-m",
        "steer_adapters.vllm.launcher",
        "--demo",
        "--port",
        str(args.port),
        "--host",
        "127.0.0.1",
        "--max-model-len",
        "1024",
    ]
    if not args.compile:
        cmd.append("--enforce-eager")
    print("demo: starting", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_for_health(base, server, timeout_s=900)
        model = requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        hits = requests.get(f"{base}/v1/steering/features", params={"q": args.concept}, timeout=10).json()[
            "data"
        ]
        if not hits:
            sys.exit(f"demo: no feature label matches {args.concept!r}")
        feature = hits[0]
        value = args.value if args.value is not None else round(1.7 * feature.get("max_activation", 40.0), 1)
        steering = {
            "features": [{"sae": feature["sae"], "index": feature["index"], "op": "clamp", "value": value}]
        }
        print(
            f"demo: feature {feature['sae']}/{feature['index']} labelled {feature['label']!r}, clamped to {value:g}"
        )
        plain = chat(base, model, args.question, None, args.max_tokens)
        steered = chat(base, model, args.question, steering, args.max_tokens)
        print("\n=== question ===\n" + args.question)
        print("\n=== unsteered ===\n" + plain)
        print(f"\n=== steered: clamp {feature['label']!r} = {value:g} ===\n" + steered + "\n", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()

"""The README's main job: start the demo server with the plugin, send the same chat unsteered and steered.

    python examples/demo.py [--concept bridge] [--value 40] [--port 8077] [--compile] [--log demo-server.log]

It builds the demo assets when missing (steer-serve-demo does), starts the server on loopback, takes the
concept's feature that the asset build's analysis recorded (``quality.json`` beside the SAE:
``concepts.<concept>.best``, chosen by measured activations, so it is right for whatever SAE was built here;
no label or index is hard-coded), checks that the server serves it, chooses the clamp value by measurement
(steer_demo.strength: the smallest that names the concept while staying fluent), clamps it on every token,
and prints both answers. The server's own output goes to a log file whose path it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import requests

from steer_demo.strength import answer

DEFAULT_QUESTION = "What should I see on a weekend trip? Answer in two sentences."


def wait_for_health(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    started = time.time()
    while time.time() - started < timeout_s:
        if server.poll() is not None:
            sys.exit(f"demo: the server exited with code {server.returncode} (see the server log)")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                print(f"demo: server ready after {time.time() - started:.0f}s", flush=True)
                return
        except requests.ConnectionError:
            pass
        time.sleep(2)
    sys.exit(f"demo: server not ready after {timeout_s:.0f}s")


def recorded_feature(base: str, concept: str) -> dict:
    """The concept's feature as the analysis recorded it, cross-checked against the server's label search."""
    from steer_demo.build_assets import ensure_assets
    from steer_demo.concept import concept_feature

    paths = ensure_assets(verbose=False)  # the server has built them by now: returns at once
    try:
        recorded = concept_feature(paths, concept)
    except (LookupError, OSError) as e:
        sys.exit(f"demo: {e}")
    with open(paths.labels_path, encoding="utf-8") as f:
        entry = json.load(f)["features"][recorded.index]
    hits = requests.get(
        f"{base}/v1/steering/features", params={"sae": "demo", "q": recorded.label or ""}, timeout=10
    ).json()["data"]
    if not any(h["index"] == recorded.index for h in hits):
        sys.exit(f"demo: the server does not list feature demo/{recorded.index} ({recorded.label!r})")
    return {
        "sae": "demo",
        "index": recorded.index,
        "label": recorded.label,
        "max_activation": entry.get("max_act") or 40.0,
    }


def measured_strength(base: str, model: str, feature: dict, args) -> tuple[float, str, str]:
    """(clamp value, plain answer, steered answer): the smallest value whose answer names the concept while
    staying fluent, tried on this server (steer_demo.strength), with the answers it got."""
    from steer_demo.labels import CONCEPTS
    from steer_demo.strength import choose_strength

    words = CONCEPTS[args.concept]["word_tokens"]
    print(f"demo: choosing the clamp value (smallest that names {'/'.join(words)!r} fluently):", flush=True)

    def show(tried, passed):
        verdict = (
            "chosen" if passed else ("names it, not fluent" if tried.names_concept else "does not name it")
        )
        print(
            f"  {tried.value:7.1f}  fluency {tried.fluency:6.2f}  distinct {tried.distinct:.2f}  {verdict}",
            flush=True,
        )

    choice = choose_strength(
        base, model, feature["sae"], feature["index"], feature["max_activation"], args.question, words,
        args.max_tokens, on_answer=show,
    )  # fmt: skip
    print(f"  (plain answer: fluency {choice.plain.fluency:.2f})", flush=True)
    shown = choice.chosen
    if shown is None:
        shown = max(choice.tried, key=lambda a: (a.names_concept, a.fluency))
        print(f"demo: no value passed; showing {shown.value:g}", flush=True)
    return shown.value, choice.plain.text, shown.text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concept", default="bridge", help="concept whose recorded feature to clamp (quality.json concepts)"
    )
    parser.add_argument(
        "--value",
        type=float,
        default=None,
        help="clamp value (default: the smallest that names the concept fluently, measured on the server)",
    )
    parser.add_argument("--log", default="demo-server.log", help="server log file")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--compile", action="store_true", help="vLLM's default compile mode (slower start)")
    args = parser.parse_args()

    base = f"http://127.0.0.1:{args.port}"
    cmd = [
        sys.executable,
        "-m",
        "steer_demo.serve",
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
    log_path = os.path.abspath(args.log)
    print(f"demo: server log in {log_path}", flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_health(base, server, timeout_s=900)
            model = requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
            feature = recorded_feature(base, args.concept)
            print(
                f"demo: feature {feature['sae']}/{feature['index']} labelled {feature['label']!r}", flush=True
            )
            if args.value is None:  # the chooser's own greedy answers
                value, plain, steered = measured_strength(base, model, feature, args)
            else:
                value = args.value
                op = {"sae": feature["sae"], "index": feature["index"], "op": "clamp", "value": value}
                plain = answer(base, model, args.question, None, args.max_tokens).text
                steered = answer(base, model, args.question, {"features": [op]}, args.max_tokens).text
            print("\n=== question ===\n" + args.question)
            print("\n=== unsteered ===\n" + plain)
            print(f"\n=== steered: clamp {feature['label']!r} = {value:g} ===\n" + steered + "\n", flush=True)
        finally:
            server.terminate()  # its shutdown messages go to the log, not here
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()

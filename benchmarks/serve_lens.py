"""serve_bench's vllm-lens side (cases l0, l1, l): the side venv's versions, (l)'s steering vector in vllm-lens'
wire form, and the untimed greedy check that the vector reaches the model.

(l)'s vector is the very vector (c)'s `add` puts on the residual (value·W_dec[index] of the demo SAE, at its layer;
serve_cases.write_configs writes it), serialised by vllm-lens' own SteeringVector in the side venv
(vllm_lens_side.build_vector).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import vllm_lens_side as lens_side
from harness.load import complete
from harness.servers import Server
from serve_cases import PROMPTS, Requests


@dataclass
class LensPrepared:
    record: dict  # the run's `lens` record: the venv, its versions, (l)'s vector
    wire: str | None  # (l)'s vector in vllm-lens' wire form (None when (l) does not run)


def prepare(venv: str, cases: list[str], vector_path: Path) -> LensPrepared:
    """The side venv's versions, and (l)'s vector in vllm-lens' wire form when (l) runs."""
    python = lens_side.side_python(venv)
    side = lens_side.side_versions(python)
    print(f"vllm-lens side venv: {side}", flush=True)
    record: dict = {"venv": venv, "side": side}
    if "l_lens_vector" not in cases:
        return LensPrepared(record, None)
    vec = json.loads(vector_path.read_text())
    info = lens_side.build_vector(python, {"vector": vec["values"], "layer": vec["layer"]})
    wire = info.pop("apply_steering_vectors")
    record["vector"] = {
        **info,
        "layer": vec["layer"],
        "source": "(c)'s add: value·W_dec[index] of the demo SAE (times its output scale)",
        "request_field": "vllm_xargs.apply_steering_vectors",
        "wire_bytes": len(wire),
    }
    print(
        f"(l)'s vector: layer {vec['layer']}, norm {info['vector_norm']:.3f} (= (c)'s add), wire {len(wire)} bytes",
        flush=True,
    )
    return LensPrepared(record, wire)


def _greedy(server: Server, requests: Requests, case: str, i: int, max_tokens: int) -> tuple[str, list]:
    body = requests.body(case, i, max_tokens, f"bench-check-{i}-{random.random():.6f}", check=True)
    choice = complete(server.url, body)
    return choice["text"], (choice.get("logprobs") or {}).get("token_logprobs") or []


def _max_diff(a: list, b: list) -> float | None:
    return max((abs(x - y) for x, y in zip(a, b, strict=False)), default=None)


def check(
    servers: dict[str, Server], requests: Requests, prompts: int = 2, max_tokens: int = 12
) -> dict | None:
    """Not timed: does (l)'s vector reach the model? Greedy completions with and without it on the vllm-lens
    server; the vector is small (the size of (c)'s add), so the logprobs of the greedy tokens are compared, not
    only the text. With (l0)'s server up, also whether vllm-lens without a vector answers as plain vLLM does."""
    if "lens" not in servers or requests.lens_wire is None:
        return None
    rows = []
    for i, prompt in enumerate(PROMPTS[:prompts]):
        # (l0)'s request (no field) and (l)'s on the lens server
        text0, lp0 = _greedy(servers["lens"], requests, "l0_lens_plain", i, max_tokens)
        text1, lp1 = _greedy(servers["lens"], requests, "l_lens_vector", i, max_tokens)
        row = {
            "prompt": prompt,
            "unsteered": text0,
            "steered": text1,
            "max_abs_logprob_diff": _max_diff(lp0, lp1),
        }
        if "lens_plain" in servers:
            plain, lp_plain = _greedy(servers["lens_plain"], requests, "l0_lens_plain", i, max_tokens)
            row["plain"] = plain
            row["unsteered_vs_plain_max_abs_logprob_diff"] = _max_diff(lp0, lp_plain)
        rows.append(row)
    diffs = [r["max_abs_logprob_diff"] for r in rows]
    out = {
        "greedy_max_tokens": max_tokens,
        "prompts": len(rows),
        "text_differs": sum(r["steered"] != r["unsteered"] for r in rows),
        "logprobs_differ": sum(1 for d in diffs if d),
        "vector_applied": all(diffs),
    }
    if "lens_plain" in servers:
        out["unsteered_equals_plain"] = sum(r["unsteered"] == r["plain"] for r in rows)
    out["rows"] = rows
    print(
        f"[eager] (l)'s vector changes the greedy logprobs in {out['logprobs_differ']}/{len(rows)} prompts (text in "
        f"{out['text_differs']}/{len(rows)})"
        + (
            f"; vllm-lens without it answers as plain vLLM in {out['unsteered_equals_plain']}/{len(rows)}"
            if "unsteered_equals_plain" in out
            else ""
        ),
        flush=True,
    )
    return out

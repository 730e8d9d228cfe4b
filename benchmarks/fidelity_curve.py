#!/usr/bin/env python
"""Fidelity curve of the demo's concept feature: steering value -> concept probability and fluency.

    python benchmarks/fidelity_curve.py                                    # full sweep (5-10 min on 2 CPU cores)
    python benchmarks/fidelity_curve.py --values 0,2 --prompts 1 --max-tokens 8 --out-dir /tmp/fid   # smoke

The feature is the one the asset analysis recorded for the bridge concept (steer_demo.concept), never
a literal index; values are multiples of its largest activation in the corpus (labels.json `max_act`, as
steer_demo.strength picks them). For `add` and `clamp` at every value, one vLLM engine (fp32, eager,
the plugin loaded) answers a few fixed chat prompts greedily, all cases in one batched generate, each request
steered by its own SamplingParams (every position, like the demo). Per answer:

  - concept probability: mean over the answer's next-token predictions of the probability mass the *steered*
    model puts on the concept's word tokens (every vocabulary token that is " bridge", "Bridges", ... once
    stripped and lower-cased; labels.CONCEPTS). vLLM returns only the top log-probs, so the full distribution
    comes from the HF reference adapter (steer_adapters.hf.reference, the tests' ground truth) fed the same
    resolved operations and vLLM's answer; `agreement` is the share of positions where its argmax is vLLM's
    token (the two models are the same steered model up to fp32 rounding);
  - named: the answer names the concept as a whole word (steer_demo.strength.names_concept);
  - fluency: the *unsteered* model's mean log-prob per answer token (the same engine's prompt_logprobs of
    prompt + answer, unsteered; strength.py's proxy), and distinct: share of distinct tokens (catches loops).

Rows average the answers (each prompt weighs the same); Δfluency is against the unsteered answers.
Writes OUT_DIR/fidelity-curve.json, .md and .png; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

for _key, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("VLLM_CPU_KVCACHE_SPACE", "1"),
    ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
):
    os.environ.setdefault(_key, _value)

from machine import cpu_model, git_state  # noqa: E402 - after the environment vLLM reads at import

REPO = Path(__file__).resolve().parents[1]
NAME = "fidelity-curve"
OPS = ("add", "clamp")
DEFAULT_MULTIPLES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
DEMO_QUESTION = "What should I see on a weekend trip? Answer in two sentences."  # examples/demo.py's
CONCEPT = "bridge"
SAE_ID = "demo"
MAX_MODEL_LEN = 512


def log(message: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- what is measured ---------------------------------------------------------------------------------------------


class Feature(NamedTuple):
    index: int
    label: str | None
    max_act: float  # largest activation in the corpus (labels.json): the unit of the sweep


class Case(NamedTuple):
    op: str  # "plain" (unsteered), "add" or "clamp"
    multiple: float  # of Feature.max_act
    value: float  # the op's value

    def steering(self, feature: Feature) -> dict | None:
        if self.op == "plain":
            return None
        return {"features": [{"sae": SAE_ID, "index": feature.index, "op": self.op, "value": self.value}]}


class Answer(NamedTuple):
    case: Case
    prompt: int  # index into the prompt list
    prompt_ids: list[int]
    answer_ids: list[int]  # greedy tokens (the EOS token included when it stopped there)
    text: str


class Scored(NamedTuple):
    answer: Answer
    concept_prob: float  # mean over positions of P(concept token) under the steered model
    agreement: float  # share of positions where the HF steered argmax is vLLM's token
    named: bool  # names the concept as a whole word
    fluency: float  # mean log-prob per token under the unsteered model
    distinct: float  # distinct tokens / tokens


class Row(NamedTuple):
    op: str
    multiple: float
    value: float
    concept_prob: float
    named: float  # share of answers
    fluency: float
    d_fluency: float  # against the plain answers
    distinct: float
    agreement: float
    answers: list[str]


def chat_prompts(n: int) -> list[str]:
    """The demo's question, then the first corpus prompt of each non-bridge topic (demo.prompts), in order."""
    from steer_demo.prompts import OTHER_PROMPTS

    firsts: dict[str, str] = {}
    for topic, prompt in OTHER_PROMPTS:
        firsts.setdefault(topic, prompt)
    prompts = [DEMO_QUESTION, *firsts.values()]
    if not 1 <= n <= len(prompts):
        raise SystemExit(f"--prompts must be between 1 and {len(prompts)}")
    return prompts[:n]


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in newer transformers


def concept_feature_of(paths) -> Feature:
    from steer_demo.concept import concept_feature

    recorded = concept_feature(paths, CONCEPT)
    entry = json.loads(Path(paths.labels_path).read_text())["features"][recorded.index]
    return Feature(recorded.index, recorded.label, float(entry["max_act"]))


def concept_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """Every vocabulary token that is one of `words` once stripped and lower-cased (the analysis' rule for the
    concept's own tokens, demo.labels, applied to the whole vocabulary instead of the corpus)."""
    wanted = {w.lower() for w in words}
    return [t for t in range(len(tokenizer)) if tokenizer.decode([t]).strip().lower() in wanted]


def sweep(multiples: list[float], feature: Feature) -> list[Case]:
    cases = [Case("plain", 0.0, 0.0)]
    for op in OPS:
        cases += [Case(op, m, round(m * feature.max_act, 3)) for m in multiples]
    return cases


# --- vLLM: the steered answers and the unsteered model's scores of them --------------------------------------------


def write_config(folder: Path, sae_dir: Path) -> Path:
    path = folder / "steer.json"
    path.write_text(json.dumps({"saes": [{"id": SAE_ID, "path": str(sae_dir)}]}))
    return path


def make_llm(model_dir: Path, config_path: Path):
    from vllm import LLM

    # fp32: greedy answers then do not depend on the batch's composition, and match the fp32 HF reference.
    return LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        additional_config={"steer_plugin": {"config_path": str(config_path)}},
    )


def shutdown(llm) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def sampling_params(catalog, steering: dict | None, **kwargs):
    from vllm import SamplingParams

    from steer_plugin.request.resolve import resolve_spec
    from steer_plugin.request.schema import parse_spec
    from steer_plugin.request.wire import WIRE_KEY, RequestPlan

    extra = (
        {WIRE_KEY: RequestPlan.build(resolve_spec(parse_spec(steering), catalog)).encode()}
        if steering
        else None
    )
    return SamplingParams(temperature=0.0, extra_args=extra, **kwargs)


def generate(llm, catalog, feature, cases, prompt_ids, max_tokens: int) -> list[Answer]:
    """Every case x prompt in one batched generate; each request carries its own steering."""
    jobs = [(case, p) for case in cases for p in range(len(prompt_ids))]
    params = [sampling_params(catalog, case.steering(feature), max_tokens=max_tokens) for case, _ in jobs]
    outputs = llm.generate([{"prompt_token_ids": prompt_ids[p]} for _, p in jobs], params, use_tqdm=False)
    return [
        Answer(case, p, prompt_ids[p], list(out.outputs[0].token_ids), out.outputs[0].text)
        for (case, p), out in zip(jobs, outputs)
    ]


def unsteered_fluency(llm, answers: list[Answer]) -> list[float]:
    """Mean log-prob per answer token under the unsteered model: prompt_logprobs of prompt + answer."""
    params = [sampling_params(None, None, max_tokens=1, prompt_logprobs=0) for _ in answers]
    prompts = [{"prompt_token_ids": a.prompt_ids + a.answer_ids} for a in answers]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    scores = []
    for a, out in zip(answers, outputs):
        scored = out.prompt_logprobs[len(a.prompt_ids) :]  # one {token id: Logprob} per answer token
        total = sum(entry[t].logprob for entry, t in zip(scored, a.answer_ids))
        scores.append(total / len(a.answer_ids) if a.answer_ids else float("-inf"))
    return scores


# --- HF reference: the steered model's full next-token distribution ------------------------------------------------


def concept_mass(hf, feature, answer: Answer, concept_ids) -> tuple[float, float]:
    """(mean P(concept token), argmax agreement with vLLM) over the answer's positions, steered as in vLLM."""
    import torch

    steering = answer.case.steering(feature)
    n_prompt, n_answer = len(answer.prompt_ids), len(answer.answer_ids)
    if n_answer == 0:
        return 0.0, 1.0
    ids = answer.prompt_ids + answer.answer_ids
    with torch.no_grad(), hf.steering(steering, n_prompt):
        logits = hf.model(torch.tensor([ids])).logits[0].float()  # [T, vocab]
    # Row n_prompt - 1 + j predicts answer token j.
    probs = torch.softmax(logits[n_prompt - 1 : n_prompt - 1 + n_answer], dim=-1)  # [L, vocab]
    mass = probs[:, concept_ids].sum(dim=-1)  # [L]
    agree = (probs.argmax(dim=-1) == torch.tensor(answer.answer_ids)).float().mean()
    return float(mass.mean()), float(agree)


# --- tables ----------------------------------------------------------------------------------------------------------


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarize(scored: list[Scored], cases: list[Case]) -> list[Row]:
    plain_fluency = mean(s.fluency for s in scored if s.answer.case.op == "plain")
    rows = []
    for case in cases:
        mine = sorted((s for s in scored if s.answer.case == case), key=lambda s: s.answer.prompt)
        fluency = mean(s.fluency for s in mine)
        rows.append(
            Row(
                case.op,
                case.multiple,
                case.value,
                mean(s.concept_prob for s in mine),
                mean(float(s.named) for s in mine),
                fluency,
                fluency - plain_fluency,
                mean(s.distinct for s in mine),
                mean(s.agreement for s in mine),
                [s.answer.text for s in mine],
            )
        )
    return rows


def markdown(report: dict) -> str:
    s, f = report["settings"], report["feature"]
    lines = [
        "# Fidelity curve: the demo's concept feature",
        "",
        f"Feature `{SAE_ID}/{f['index']}` ({f['label']!r}, recorded for the `{CONCEPT}` concept), "
        f"largest corpus activation {f['max_act']:g}; concept tokens {s['concept_tokens']}.",
        f"{s['prompts']} chat prompts, greedy, {s['max_tokens']} tokens at most, every position steered; "
        f"vLLM {report['machine']['vllm']} fp32 eager on {report['machine']['cpu_model']}, "
        f"commit {report['machine']['commit']}, {report['elapsed_s']:.0f} s.",
        "",
        "concept prob: mean P(concept token) per next-token prediction of the steered model; named: answers "
        "naming the concept as a whole word; fluency: the unsteered model's mean log-prob per token of the "
        "answer (Δ against the unsteered answers); distinct: share of distinct tokens; agreement: HF reference "
        "argmax = vLLM token. A high fluency with a low distinct share is a repetitive loop, not fluent text.",
        "",
        "| op | value (× max act) | value | concept prob | named | fluency | Δfluency | distinct | agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['op']} | {r['multiple']:g} | {r['value']:g} | {r['concept_prob']:.3g} | "
            f"{100 * r['named']:.0f}% | {r['fluency']:.2f} | {r['d_fluency']:+.2f} | {r['distinct']:.2f} | "
            f"{r['agreement']:.2f} |"
        )
    lines += ["", f"Answers to the first prompt ({s['prompt_texts'][0]!r}):", ""]
    lines += ["| op | × max act | answer |", "|---|---|---|"]
    for r in report["rows"]:
        text = " ".join(r["answers"][0].split()).replace("|", "\\|")
        lines.append(f"| {r['op']} | {r['multiple']:g} | {text[:160]}{'…' if len(text) > 160 else ''} |")
    if report.get("plot"):
        lines += ["", f"![fidelity curve]({report['plot']})"]
    return "\n".join(lines) + "\n"


def _panel(ax, x, left, right, plain: float, left_label: str, right_label: str, log: bool) -> None:
    """`left` on ax (blue, with the unsteered level dotted), `right` on a twin axis (red, a share in [0, 1])."""
    floor = 1e-7 if log else float("-inf")  # log axis: a zero would vanish
    ax.plot(x, [max(v, floor) for v in left], "o-", color="tab:blue", label=left_label)
    ax.axhline(max(plain, floor), color="tab:blue", ls=":", lw=1, label="unsteered")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(left_label, color="tab:blue")
    twin = ax.twinx()
    twin.plot(x, right, "s--", color="tab:red", label=right_label)
    twin.set_ylim(-0.05, 1.05)
    twin.set_ylabel(right_label, color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")


def plot(report: dict, path: Path) -> bool:
    """Columns add, clamp; top: concept probability (log) and named share; bottom: Δfluency and distinct
    share (a high fluency with few distinct tokens is a loop, not fluent text)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    plain = next(r for r in rows if r["op"] == "plain")
    fig, axes = plt.subplots(2, len(OPS), figsize=(12, 7), sharex=True)  # [2 rows, one column per op]
    for col, op in enumerate(OPS):
        mine = [r for r in rows if r["op"] == op]
        x = [r["multiple"] for r in mine]
        top, bottom = axes[0][col], axes[1][col]
        _panel(
            top, x, [r["concept_prob"] for r in mine], [r["named"] for r in mine], plain["concept_prob"],
            "concept token probability", "share of answers naming it", log=True,
        )  # fmt: skip
        _panel(
            bottom, x, [r["d_fluency"] for r in mine], [r["distinct"] for r in mine], 0.0,
            "Δfluency vs unsteered (nats/token)", "distinct-token share", log=False,
        )  # fmt: skip
        top.set_title(f"{op}")
        bottom.set_xlabel(f"{op} value (× max activation {report['feature']['max_act']:g})")
    feature = report["feature"]
    fig.suptitle(f"Concept feature {SAE_ID}/{feature['index']} ({feature['label']}): steering value sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- main --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument(
        "--values",
        default=",".join(f"{m:g}" for m in DEFAULT_MULTIPLES),
        help="comma-separated multiples of the feature's recorded max activation, for add and clamp alike",
    )
    ap.add_argument("--prompts", type=int, default=4, help="how many fixed chat prompts (the demo's first)")
    ap.add_argument("--max-tokens", type=int, default=60)
    return ap.parse_args(argv)


def measure(args, paths, feature, prompts, multiples) -> tuple[list[Scored], list[Case], list[int]]:
    import torch

    from steer_adapters.hf.reference import HFReference
    from steer_demo.labels import CONCEPTS
    from steer_demo.strength import names_concept
    from steer_plugin.catalog import load_assets
    from steer_plugin.config import load_config_file

    words = CONCEPTS[CONCEPT]["word_tokens"]
    cases = sweep(multiples, feature)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = write_config(Path(tmp), paths.sae_dir)
        assets = load_assets(load_config_file(str(config_path)))
        catalog = assets.catalog()
        log("loading the vLLM engine (fp32, eager, plugin loaded)")
        llm = make_llm(paths.model_dir, config_path)
        try:
            tokenizer = llm.get_tokenizer()
            prompt_ids = [chat_ids(tokenizer, q) for q in prompts]
            log(f"generating {len(cases)} cases x {len(prompts)} prompts in one batch")
            answers = generate(llm, catalog, feature, cases, prompt_ids, args.max_tokens)
            log("scoring them under the unsteered model")
            fluency = unsteered_fluency(llm, answers)
        finally:
            shutdown(llm)
        hf = HFReference(str(paths.model_dir), assets, dtype=torch.float32)
        concept_ids = concept_token_ids(hf.tokenizer, words)
        scored = []
        for i, (a, flu) in enumerate(zip(answers, fluency)):
            if i % len(prompts) == 0:
                log(f"concept probability (HF): {a.case.op} {a.case.multiple:g}x ({i}/{len(answers)})")
            prob, agree = concept_mass(hf, feature, a, concept_ids)
            distinct = len(set(a.answer_ids)) / max(1, len(a.answer_ids))
            scored.append(Scored(a, prob, agree, names_concept(a.text, words), flu, distinct))
    return scored, cases, concept_ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    multiples = [float(v) for v in args.values.split(",") if v.strip()]
    started = time.time()
    from steer_demo.build_assets import ensure_assets

    paths = ensure_assets(verbose=False)
    feature = concept_feature_of(paths)
    prompts = chat_prompts(args.prompts)
    log(f"feature {SAE_ID}/{feature.index} ({feature.label!r}), max activation {feature.max_act:g}")
    scored, cases, concept_ids = measure(args, paths, feature, prompts, multiples)
    rows = summarize(scored, cases)

    import vllm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(paths.model_dir))
    commit, dirty = git_state()
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {"cpu_model": cpu_model(), "vllm": vllm.__version__, "commit": commit, "dirty": dirty},
        "feature": feature._asdict(),
        "settings": {
            "concept": CONCEPT,
            "concept_tokens": [tokenizer.decode([t]) for t in concept_ids],
            "concept_token_ids": concept_ids,
            "multiples": multiples,
            "prompts": len(prompts),
            "prompt_texts": prompts,
            "max_tokens": args.max_tokens,
            "dtype": "float32",
            "positions": "all",
        },
        "rows": [r._asdict() for r in rows],
        "answers": [
            {
                "op": s.answer.case.op,
                "multiple": s.answer.case.multiple,
                "prompt": s.answer.prompt,
                "text": s.answer.text,
                "tokens": len(s.answer.answer_ids),
                "concept_prob": s.concept_prob,
                "named": s.named,
                "fluency": s.fluency,
                "distinct": s.distinct,
                "agreement": s.agreement,
            }
            for s in scored
        ],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"{NAME}.png"
    report["plot"] = png.name if plot(report, png) else None
    (args.out_dir / f"{NAME}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"{NAME}.md").write_text(markdown(report))
    log(
        f"wrote {args.out_dir / NAME}.json, .md{', .png' if report['plot'] else ''} in {report['elapsed_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's steering strength, chosen by measurement on the server that will answer.

How strongly a clamp must hold a concept feature before the answer names the concept depends on the SAE that
was built, the model's dtype and the question, and it is not monotonic: a value that works for one build can
give an unrelated answer on another, and too much gives word salad. So the demo does not use a fixed multiple:
it tries increasing clamp values (multiples of the feature's largest activation in the corpus) on the running
server and takes the smallest whose greedy answer names the concept while staying fluent.

Fluency proxy: the mean log-probability per token of the answer under the *unsteered* model (the same server,
scoring the answer as a continuation of the prompt), compared with the plain answer's own; plus the share of
distinct tokens, which catches the repetitive loops that a high log-probability can hide.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import requests

MULTIPLES = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
"""Clamp values tried, as multiples of the feature's largest activation in the corpus."""
MAX_FLUENCY_DROP = 2.0
"""A steered answer may score at most this many nats per token below the plain answer."""
MIN_DISTINCT = 0.5
"""Least share of distinct tokens in a steered answer (below: a loop)."""


class Answer(NamedTuple):
    value: float  # clamp value (0: plain)
    text: str
    names_concept: bool
    fluency: float  # mean log-prob per answer token under the unsteered model
    distinct: float  # distinct tokens / tokens


class StrengthChoice(NamedTuple):
    value: float | None  # None: no value passed
    plain: Answer
    tried: list[Answer]

    @property
    def chosen(self) -> Answer | None:
        return next((a for a in self.tried if a.value == self.value), None)


def names_concept(text: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in words)


class Reply(NamedTuple):
    text: str
    prompt_ids: list[int]
    answer_ids: list[int]


def answer(base: str, model: str, question: str, steering: dict | None, max_tokens: int) -> Reply:
    """The server's greedy chat answer to `question` (with `steering` when given)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    if steering:
        body["steering"] = steering
    reply = requests.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    reply.raise_for_status()
    data = reply.json()
    choice = data["choices"][0]
    return Reply(choice["message"]["content"] or "", data["prompt_token_ids"], choice["token_ids"])


def _fluency(base: str, model: str, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean log-prob of answer_ids after prompt_ids under the unsteered model (vLLM's prompt_logprobs)."""
    if not answer_ids:
        return float("-inf")
    body = {"model": model, "prompt": prompt_ids + answer_ids, "max_tokens": 1, "prompt_logprobs": 0}
    reply = requests.post(f"{base}/v1/completions", json=body, timeout=300)
    reply.raise_for_status()
    scored = reply.json()["choices"][0]["prompt_logprobs"][len(prompt_ids) :]  # one {id: {logprob}} per token
    total = sum(entry[str(t)]["logprob"] for entry, t in zip(scored, answer_ids))
    return total / len(answer_ids)


def measure(
    base: str, model: str, question: str, steering: dict | None, value: float, words, max_tokens: int
) -> Answer:
    text, prompt_ids, answer_ids = answer(base, model, question, steering, max_tokens)
    return Answer(
        value,
        text,
        names_concept(text, words),
        _fluency(base, model, prompt_ids, answer_ids),
        len(set(answer_ids)) / max(1, len(answer_ids)),
    )


def choose_strength(
    base: str,
    model: str,
    sae: str,
    index: int,
    max_activation: float,
    question: str,
    words: tuple[str, ...],
    max_tokens: int = 60,
    multiples: tuple[float, ...] = MULTIPLES,
    on_answer=None,
) -> StrengthChoice:
    """The smallest clamp value (of `multiples` × max_activation) whose answer names one of `words`, scores
    within MAX_FLUENCY_DROP of the plain answer and has at least MIN_DISTINCT distinct tokens. Stops at the
    first that passes; `on_answer(answer, passed)` sees each try (progress)."""
    plain = measure(base, model, question, None, 0.0, words, max_tokens)
    tried = []
    for m in multiples:
        value = round(m * max_activation, 1)
        steering = {"features": [{"sae": sae, "index": index, "op": "clamp", "value": value}]}
        result = measure(base, model, question, steering, value, words, max_tokens)
        tried.append(result)
        passed = (
            result.names_concept
            and result.fluency >= plain.fluency - MAX_FLUENCY_DROP
            and result.distinct >= MIN_DISTINCT
        )
        if on_answer is not None:
            on_answer(result, passed)
        if passed:
            return StrengthChoice(value, plain, tried)
    return StrengthChoice(None, plain, tried)

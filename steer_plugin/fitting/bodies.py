"""The fit endpoints' bodies: POST /v1/steering/probes:fit and /v1/steering/vectors:fit.

Everything a client sends is bounded (examples, text length, classes; the total of tokens is bounded when
the texts are tokenized, run.py) and typed strictly (a layer of "3" or true is refused, NaN too): a bad body
is a 400 naming the JSON path of the field (`examples[3].label`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steer_plugin.request.schema import SpecError, first_error

MAX_EXAMPLES = 512  # texts of a probe fit; pairs of a vector fit
MAX_TEXT_CHARS = 8192
MAX_FIT_CLASSES = 16
MIN_PER_CLASS = 2  # one to train on, one held out at the least
ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"
SAVE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")  # a name inside the root, never a path


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Example(_Body):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    """The text whose residual is read (a raw prompt, tokenized as /v1/completions does)."""
    label: str = Field(min_length=1, max_length=128)
    """Its class."""


class Pair(_Body):
    positive: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    """A text with the concept."""
    negative: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    """Its contrast, without it."""


class FitProbeBody(_Body):
    """POST /v1/steering/probes:fit."""

    id: str = Field(pattern=ID_PATTERN, max_length=128)
    """The probe's id once registered."""
    layer: int = Field(ge=0, le=9999)
    """The decoder layer whose output residual is read (the workers must capture it)."""
    examples: list[Example] = Field(min_length=2 * MIN_PER_CLASS, max_length=MAX_EXAMPLES)
    """Labelled texts."""
    pooling: Literal["mean", "last"] = "mean"
    """mean: the mean of the text's residual rows (attention-sink positions left out); last: its last row."""
    labels: list[str] | None = Field(default=None, min_length=2, max_length=MAX_FIT_CLASSES)
    """The classes, in order; default: the examples' labels, sorted. Two: one sigmoid class named after the
    second (the positive one); more: one sigmoid class per label (one-vs-rest)."""
    held_out: float = Field(default=0.25, ge=0.1, le=0.5)
    """Share of the examples held out (stratified) to measure AUROC and accuracy."""
    save_to: str | None = Field(default=None, max_length=128)
    """Folder name under the first runtime root (default: the id); it must not exist yet."""
    model: str | None = Field(default=None, max_length=256)
    """The served model name (as /v1/completions takes it)."""


class FitVectorBody(_Body):
    """POST /v1/steering/vectors:fit."""

    id: str = Field(pattern=ID_PATTERN, max_length=128)
    """The vector's id once registered."""
    layer: int = Field(ge=0, le=9999)
    """The decoder layer whose output residual is read and steered (it must have reserved rows)."""
    pairs: list[Pair] = Field(min_length=1, max_length=MAX_EXAMPLES)
    """Contrastive pairs."""
    pooling: Literal["mean", "last"] = "mean"
    """As for probes."""
    save_to: str | None = Field(default=None, max_length=128)
    """File name under the first runtime root, ending in .safetensors (default: `{id}.safetensors`)."""
    model: str | None = Field(default=None, max_length=256)


class ProbeTask(NamedTuple):
    """A checked probe fit: the body, the classes in order and each example's class index."""

    body: FitProbeBody
    labels: tuple[str, ...]
    targets: tuple[int, ...]


def _validated(model: type[_Body], data: object):
    if not isinstance(data, dict):
        raise SpecError("body", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise first_error(err) from None


def save_name(given: str | None, default: str, suffix: str = "") -> str:
    """The name a fit saves under inside the root (400 naming `save_to` for anything but a plain name)."""
    name = given if given is not None else default + suffix
    if not SAVE_NAME.fullmatch(name) or name in (".", ".."):
        raise SpecError("save_to", "must be a plain name inside the runtime root (letters, digits, _ . -)")
    if suffix and not name.endswith(suffix):
        raise SpecError("save_to", f"must end in {suffix}")
    return name


def parse_probe_fit(data: object) -> ProbeTask:
    body = _validated(FitProbeBody, data)
    counts = Counter(e.label for e in body.examples)
    if body.labels is not None:
        if len(set(body.labels)) != len(body.labels):
            raise SpecError("labels", "must be distinct")
        for i, example in enumerate(body.examples):
            if example.label not in body.labels:
                raise SpecError(f"examples[{i}].label", f"{example.label!r} is not one of `labels`")
        labels = tuple(body.labels)
    else:
        labels = tuple(sorted(counts))
    if len(labels) < 2:
        raise SpecError("examples", f"all examples have one label ({labels[0]!r}): a probe needs two classes")
    if len(labels) > MAX_FIT_CLASSES:
        raise SpecError("examples", f"{len(labels)} labels; at most {MAX_FIT_CLASSES}")
    for label in labels:
        if counts[label] < MIN_PER_CLASS:
            raise SpecError(
                "labels" if body.labels is not None and not counts[label] else "examples",
                f"label {label!r} has {counts[label]} example(s); each needs at least {MIN_PER_CLASS}",
            )
    save_name(body.save_to, body.id)
    index = {label: c for c, label in enumerate(labels)}
    return ProbeTask(body, labels, tuple(index[e.label] for e in body.examples))


def parse_vector_fit(data: object) -> FitVectorBody:
    body = _validated(FitVectorBody, data)
    save_name(body.save_to, body.id, ".safetensors")
    return body

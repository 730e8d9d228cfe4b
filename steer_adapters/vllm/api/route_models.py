"""The typed requests and answers of the plugin's own routes (api/routes.py), from which /openapi.json documents
them (api/openapi.py); `validated` reads a request into its model, a bad field a SpecError naming it (a 400).

A field of POST /v1/steering/inspect that the route passes on to the completion's `steering.inspect` (top_k,
saes, features, probes) is typed as there and named as there (`steering.inspect.features[0]`): the same field,
the same error, whichever route it came through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from steer_plugin.request.schema import MAX_PROBES, MAX_TRACED, FeatureRef, first_error

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: object, prefix: Callable[[tuple], str] = lambda loc: "") -> M:
    """`data` as `model`, or SpecError naming the first bad field (its JSON path, after `prefix(loc)`)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise first_error(err, prefix(err.errors()[0]["loc"])) from None


class _Model(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)  # docstrings in /openapi.json


def _digits(most: int, message: str) -> BeforeValidator:
    """A query value of ASCII digits only (no sign, no Unicode digits, at most `most` of them)."""

    def check(value: object) -> object:
        if not re.fullmatch(rf"[0-9]{{1,{most}}}", str(value)):
            raise ValueError(message)
        return value

    return BeforeValidator(check)


# --- requests ----------------------------------------------------------------------------------------------


class FeatureSearchQuery(_Model):
    """The query of GET /v1/steering/features (other query parameters are ignored)."""

    model_config = ConfigDict(extra="ignore")

    sae: str | None = None
    """Search this SAE only (all the SAEs requests may read when unset)."""
    q: str | None = None
    """Matched against labels and explanations: an exact match first, then whole word, prefix, substring."""
    limit: Annotated[int, _digits(7, "must be an integer")] = Field(
        default=20, json_schema_extra={"minimum": 1, "maximum": 1000}
    )
    """At most this many hits (1 to 1000)."""
    index: Annotated[int | None, _digits(9, "must be a non-negative integer")] = Field(
        default=None, json_schema_extra={"minimum": 0}
    )
    """That one feature of `sae`, whatever its texts."""


INSPECT_FIELDS = ("top_k", "saes", "features", "probes")  # passed on to the completion's steering.inspect


class InspectRequest(_Model):
    """POST /v1/steering/inspect: the top features of every token of a text or of chat messages."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    """The served model (the server's only one when unset)."""
    text: str | None = None
    """A text, tokenized as a completion prompt (give `text` or `messages`)."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages, rendered by the model's chat template (give `text` or `messages`)."""
    top_k: int = Field(default=5, ge=1, le=64)
    """Features reported per token and SAE."""
    saes: list[str] | None = None
    """SAE ids to read (all loaded SAEs when unset)."""
    features: list[FeatureRef] = Field(default_factory=list, max_length=MAX_TRACED)
    """Features whose activation is reported on every token (`traced`)."""
    probes: list[str] = Field(default_factory=list, max_length=MAX_PROBES)
    """Probe ids scored on every token (`probes`)."""

    @model_validator(mode="before")
    @classmethod
    def _known_fields_and_one_input(cls, data: object) -> object:
        if not isinstance(data, dict):
            raise PydanticCustomError("body", "must be a JSON object", {"param": "body"})
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            allowed = ", ".join(cls.model_fields)
            raise PydanticCustomError("unknown", f"unknown field; allowed: {allowed}", {"param": unknown[0]})
        if ("text" in data) == ("messages" in data):
            raise PydanticCustomError(
                "one_input", "give exactly one of `text` or `messages`", {"param": "text"}
            )
        return data

    @staticmethod
    def param_prefix(loc: tuple) -> str:
        return "steering.inspect" if loc and loc[0] in INSPECT_FIELDS else ""


# --- answers (documentation: the routes send what steer_plugin's discovery and the completion path build) --


class SAEInfo(_Model):
    """A loaded SAE."""

    id: str
    layer: int
    hook_name: str
    d_in: int
    d_sae: int
    architecture: str
    format: str | None = None
    neuronpedia_id: str | None = None
    num_labels: int
    num_explained: int
    revision: str | None = None
    """Set on an SAE loaded at runtime (admin routes)."""


class VectorInfo(_Model):
    """A loaded steering vector."""

    id: str
    layer: int
    d_model: int
    revision: str | None = None


class ProbeInfo(_Model):
    """A loaded probe (steer_plugin/probes/format.py)."""

    id: str
    layer: int
    labels: list[str]
    activation: Literal["sigmoid", "identity"]
    window: int
    sae: str | None = None  # the SAE whose features it reads; null: the residual
    revision: str | None = None


class SAEList(_Model):
    """GET /v1/steering/saes: the SAEs requests may read, the vectors and the probes."""

    object: Literal["list"] = "list"
    data: list[SAEInfo]
    vectors: list[VectorInfo]
    probes: list[ProbeInfo] = []
    generation: int = 0
    """The runtime loads' generation this list reflects (the workers' count of loads and unloads): every API
    process of the server lists the same sources at the same generation."""


class FeatureExplanation(_Model):
    description: str
    source: str
    model: str | None = None
    type: str | None = None


class MatchedText(_Model):
    """The text the query matched."""

    source: str
    text: str
    model: str | None = None


class FeatureHit(_Model):
    sae: str
    index: int
    label: str | None = None
    match: Literal["exact", "word", "prefix", "substring"] | None = None
    exact: bool | None = None
    matched: MatchedText | None = None
    explanations: list[FeatureExplanation] = Field(default_factory=list)
    max_activation: float | None = None


class FeatureList(_Model):
    """GET /v1/steering/features: the best matches first, `total` counting all of them."""

    object: Literal["list"] = "list"
    data: list[FeatureHit]
    total: int


class ActiveFeature(_Model):
    index: int
    activation: float
    label: str | None = None


class TracedFeature(_Model):
    sae: str
    index: int
    label: str | None = None


class InspectToken(_Model):
    position: int
    token_id: int
    token: str | None = None
    features: dict[str, list[ActiveFeature]]
    """Per SAE, the token's top-K features."""
    sink: bool
    """An attention-sink position (config monitoring.sink_positions)."""
    traced: list[float | None] | None = None
    """With `features`: each traced feature's activation, in order."""
    probes: dict[str, dict[str, float]] | None = None
    """With `probes`: per probe, a score per label."""


class InspectResponse(_Model):
    object: Literal["list"] = "list"
    model: str | None = None
    data: list[InspectToken]
    traced_features: list[TracedFeature] | None = None


class Unloaded(_Model):
    id: str
    object: Literal["sae", "vector", "probe"]
    deleted: bool
    revision: str

"""The sources a steering config names: SAEs (by path, SAELens release or Neuronpedia id) and steering vectors.

Part of the operator configuration (config.py, which holds them in `SteerConfig.saes` / `.vectors`); the admin
API takes the same models for runtime loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

if TYPE_CHECKING:
    from steer_plugin.sae.named import ResolvedSAE


class StrictModel(BaseModel):
    """Every config object: unknown keys are errors; field docstrings are the reference docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _key_error(key: str, message: str) -> ValidationError:
    """A validation error located at `key` of the model being validated (pydantic nests it under the
    model's own location, e.g. `saes.0.sae_id`)."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    error = InitErrorDetails(type=PydanticCustomError("steer_config", message), loc=(key,), input=None)
    return ValidationError.from_exception_data("SAESource", [error])


class SAESource(StrictModel):
    """One SAE to load into every worker, named by exactly one of `path`, `release` + `sae_id`, `neuronpedia`."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    """Name requests use to refer to this SAE."""
    path: str | None = None
    """File or folder holding the SAE (any supported format)."""
    release: str | None = None
    """SAELens release, a key of the registry the sae-lens package ships (`pretrained_saes.yaml`), e.g.
    `gemma-scope-2b-pt-res-canonical`; with `sae_id`. Resolved at start-up to the release's Hugging Face Hub
    repo and fetched into the local HF cache (used as is when already there; HF_HUB_OFFLINE honoured)."""
    sae_id: str | None = None
    """SAE id within `release`, e.g. `layer_20/width_16k/canonical`."""
    neuronpedia: str | None = Field(default=None, pattern=r"^[^/\s]+/[^/\s]+$")
    """Neuronpedia source `model/source`, e.g. `gemma-2-2b/20-gemmascope-res-16k`: the registry's SAE with that
    Neuronpedia id, resolved like `release` + `sae_id`."""
    hub_revision: str | None = None
    """Branch, tag or commit of the Hub repo of a `release` / `neuronpedia` SAE (default `main`)."""
    format: str | None = None
    """Force a loader (see steer_plugin.sae.FORMATS); detected from the files when unset."""
    layer: int | None = Field(default=None, ge=0)
    """Decoder layer whose output the SAE reads; taken from the SAE's own config (hook name) when unset."""
    labels: str | None = None
    """Labels JSON (index -> label); `labels.json` next to the SAE is used when present."""
    explanations: str | None = None
    """Neuronpedia explanation export: a .json/.jsonl/.json.gz/.jsonl.gz file, or a folder of them (the bulk
    export's `explanations/batch-N.jsonl.gz`, or `/api/feature/...` answers). Searched beside the labels; see
    steer_plugin.labels.neuronpedia."""
    neuronpedia_id: str | None = None
    """`model/source` prefix of Neuronpedia feature ids; from the SAE's config when unset."""
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Loader options for the format (e.g. sparsify `hookpoint`, SAELens `norm_scaling_factor`)."""
    allow_pickle: bool = False
    """Allow non-weights-only pickle loading for .pt/.pth files (only for trusted files)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the SAE is kept in on the worker; `auto` uses the model's dtype."""

    _resolved: ResolvedSAE | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_name(self) -> SAESource:
        named = [
            key
            for key, given in (
                ("path", self.path is not None),
                ("release", self.release is not None or self.sae_id is not None),
                ("neuronpedia", self.neuronpedia is not None),
            )
            if given
        ]
        if len(named) != 1:
            got = f"got {' and '.join(f'`{k}`' for k in named)}" if named else "got none"
            raise _key_error(
                named[1] if named else "path",
                f"name the SAE by exactly one of `path`, `release` + `sae_id`, `neuronpedia` ({got})",
            )
        if (self.release is None) != (self.sae_id is None):
            missing, given = ("sae_id", "release") if self.sae_id is None else ("release", "sae_id")
            raise _key_error(missing, f"`{missing}` is required with `{given}`")
        if self.path is not None and self.hub_revision is not None:
            raise _key_error(
                "hub_revision", "`hub_revision` applies to `release` / `neuronpedia` SAEs, not to `path`"
            )
        if self.neuronpedia and self.neuronpedia_id and self.neuronpedia_id != self.neuronpedia:
            raise _key_error(
                "neuronpedia_id",
                f"`neuronpedia_id` {self.neuronpedia_id!r} contradicts `neuronpedia` {self.neuronpedia!r}",
            )
        return self

    @property
    def named(self) -> bool:
        """Whether the SAE is named by `release` + `sae_id` or `neuronpedia` rather than `path`."""
        return self.path is None

    def resolve(self) -> ResolvedSAE | None:
        """For a named SAE, where it is in the local Hugging Face cache (resolved once, downloaded if missing
        and allowed); None for a `path`. NamedSAEError (a ValueError with `.field`) when it cannot be."""
        if self.path is not None:
            return None
        if self._resolved is None:
            from steer_plugin.sae.named import resolve_named

            self._resolved = resolve_named(
                release=self.release,
                sae_id=self.sae_id,
                neuronpedia=self.neuronpedia,
                revision=self.hub_revision,
                format=self.format,
            )
        return self._resolved

    @property
    def local_path(self) -> str:
        """The file or folder the loaders read: `path`, or the named SAE's folder in the HF cache."""
        if self.path is not None:
            return self.path
        resolved = self.resolve()
        assert resolved is not None
        return resolved.local_path


class VectorSource(StrictModel):
    """A raw steering vector from a file: safetensors/pt with one tensor, or a .npy/.json list."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    """Name requests use to refer to this vector."""
    path: str
    """File holding the vector [d_model]."""
    layer: int = Field(ge=0)
    """Decoder layer after which the vector is added to the residual stream."""
    tensor: str | None = None
    """Tensor name inside a safetensors file that holds several."""


class ProbeSource(StrictModel):
    """A linear probe: a folder with probe.safetensors and probe.json (steer_plugin/probes/format.py)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    """Name requests use to refer to this probe (`steering.inspect.probes`)."""
    path: str
    """The probe's folder (its probe.json names the layer it reads)."""

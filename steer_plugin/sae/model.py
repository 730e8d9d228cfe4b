"""The one in-memory SAE layout every loader converts to, with encode and decode.

Layout (as in ../docs/sae-formats.md): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
plus the activation's extras (threshold, k, gated b_gate/b_mag/r_mag) and any input normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

Architecture = Literal["relu", "jumprelu", "topk", "batchtopk", "gated"]
ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk", "gated")

PerTokenNorm = Literal["none", "layer_norm", "constant_norm_rescale"]


@dataclass
class SAEMetadata:
    """Where an SAE reads the model and how people name it."""

    hook_name: str | None = None
    """TransformerLens-style hook, e.g. `blocks.15.hook_resid_post` (= output of decoder layer 15)."""
    layer: int | None = None
    """Decoder layer whose output (residual stream after it) the SAE reads."""
    model_name: str | None = None
    """Model the SAE was trained on, as the format names it."""
    neuronpedia_id: str | None = None
    """Neuronpedia source id `model/source`, used to resolve `model/source/index` feature ids."""
    format: str | None = None
    """Name of the loader (format) that produced this SAE."""
    source_path: str | None = None
    """File or folder it was loaded from."""
    extra: dict = field(default_factory=dict)
    """Anything else the format's config carried."""


@dataclass(frozen=True)
class SAEHeader:
    """An SAE without its tensors: what naming, describing and resolving features need (the API process's
    catalog holds these; the workers hold `SparseAutoencoder`s). From `read_sae_header` (../loading.py)."""

    d_in: int
    d_sae: int
    dtype: torch.dtype
    """Stored dtype of W_enc."""
    architecture: Architecture
    k: int | None
    metadata: SAEMetadata


class NormState(NamedTuple):
    """Per-token statistics needed to undo input normalisation after decoding."""

    mean: torch.Tensor | None  # [..., 1]
    scale: torch.Tensor | None  # [..., 1]


@dataclass
class SparseAutoencoder:
    """A sparse autoencoder in the shared layout. Tensors live wherever the loader put them.

    encode: x_n = normalise(x); x_n -= b_dec if apply_b_dec_to_input; pre = x_n @ W_enc + b_enc; f = act(pre)
    decode: x_hat = denormalise(f @ W_dec + b_dec)
    """

    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]
    architecture: Architecture = "relu"
    threshold: torch.Tensor | None = None  # [d_sae]: jumprelu per-feature, batchtopk broadcast scalar
    k: int | None = None  # topk only
    b_gate: torch.Tensor | None = None  # [d_sae], gated only
    b_mag: torch.Tensor | None = None  # [d_sae], gated only
    r_mag: torch.Tensor | None = None  # [d_sae], gated only
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the (normalised) input before encoding."""
    in_scale: float = 1.0
    """Dataset-wise input scale: x_n = x * in_scale (Llama Scope sqrt(d)/avg_norm_in, SAELens scaling_factor)."""
    out_scale: float = 1.0
    """Dataset-wise output scale applied after decoding (Llama Scope avg_norm_out/sqrt(d))."""
    per_token_norm: PerTokenNorm = "none"
    """`layer_norm` (OpenAI TopK: (x-mu)/sigma, decode*sigma+mu) or `constant_norm_rescale` (x*sqrt(d)/|x|)."""
    center_input: bool = False
    """Subtract the per-token mean before encoding (SAEs trained on TransformerLens-centred activations)."""
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; known: {', '.join(ARCHITECTURES)}"
            )
        if self.architecture in ("jumprelu", "batchtopk") and self.threshold is None:
            raise ValueError(f"{self.architecture} SAE needs a threshold tensor")
        if self.architecture == "topk" and not self.k:
            raise ValueError("topk SAE needs k > 0")
        if self.architecture == "gated" and any(t is None for t in (self.b_gate, self.b_mag, self.r_mag)):
            raise ValueError("gated SAE needs b_gate, b_mag and r_mag")
        if self.threshold is not None and self.threshold.dim() == 0:
            self.threshold = self.threshold.expand(self.d_sae).clone()

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "b_gate", "b_mag", "r_mag")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseAutoencoder:
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device=device, dtype=dtype))
        return self

    def header(self) -> SAEHeader:
        return SAEHeader(self.d_in, self.d_sae, self.dtype, self.architecture, self.k, self.metadata)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # --- normalisation -------------------------------------------------------------------------------------

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, NormState]:
        """x [..., d_in] -> the SAE's input space, plus what decode needs to map back."""
        mean = scale = None
        if self.center_input or self.per_token_norm == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)  # [..., 1]
            x = x - mean
        if self.per_token_norm == "layer_norm":
            # as OpenAI's LN and SAELens' layer_norm: unbiased std, x / (std + eps), decode * std
            scale = x.std(dim=-1, keepdim=True)  # [..., 1]
            x = x / (scale + 1e-5)
        elif self.per_token_norm == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / self.d_in**0.5  # [..., 1]
            x = x / scale
        return x * self.in_scale, NormState(mean, scale)

    def denormalise(self, x_hat: torch.Tensor, state: NormState) -> torch.Tensor:
        x_hat = x_hat * self.out_scale
        if state.scale is not None:
            x_hat = x_hat * state.scale
        if state.mean is not None:  # layer_norm and center_input both map back to residual space
            x_hat = x_hat + state.mean
        return x_hat

    # --- encode / decode -----------------------------------------------------------------------------------

    def project(self, x_normalised: torch.Tensor) -> torch.Tensor:
        """[..., d_in] in SAE input space -> [..., d_sae] its encoder product, before any bias."""
        if self.apply_b_dec_to_input:
            x_normalised = x_normalised - self.b_dec
        return x_normalised @ self.W_enc

    def pre_activations(self, x_normalised: torch.Tensor) -> torch.Tensor:
        """[..., d_in] in SAE input space -> [..., d_sae] pre-activations (gated: the gate pre-activation)."""
        return self.project(x_normalised) + (self.b_gate if self.architecture == "gated" else self.b_enc)

    def features(self, projected: torch.Tensor) -> torch.Tensor:
        """The encoder product [..., d_sae] (`project`) -> feature activations [..., d_sae]."""
        if self.architecture == "gated":
            # The magnitude path shares W_enc, rescaled per feature by exp(r_mag): x·(W_enc·diag(e)) is
            # (x·W_enc)·e, so one product serves both paths and the rescale goes on it, not on the matrix.
            gate = projected + self.b_gate
            magnitude = projected * torch.exp(self.r_mag) + self.b_mag
            return (gate > 0).to(gate.dtype) * torch.relu(magnitude)
        pre = projected + self.b_enc
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture in ("jumprelu", "batchtopk"):
            return torch.relu(pre) * (pre > self.threshold)
        values, indices = torch.topk(pre, self.k, dim=-1)  # topk
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Residual activations [..., d_in] -> features [..., d_sae]."""
        x_n, _ = self.normalise(x)
        return self.features(self.project(x_n))

    def decode(self, f: torch.Tensor, state: NormState | None = None) -> torch.Tensor:
        """Features [..., d_sae] -> reconstruction [..., d_in] in residual space."""
        x_hat = f @ self.W_dec + self.b_dec
        return self.denormalise(x_hat, state or NormState(None, None))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        x_n, state = self.normalise(x)
        return self.decode(self.features(self.project(x_n)), state)

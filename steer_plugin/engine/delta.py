"""The steering math on a block of tokens: pure tensor work, no host decisions (safe inside CUDA graphs).

Token t carries K operation entries: a working-set column col[t, k], coefficients (a, b, bn) and a gate (does
the entry apply at this token's position). With W working-set columns (the distinct bank rows in use):
    F      = x @ enc[:W]^T                        (only when some entry reads a feature; [n, W], float32)
    f      = activation of F[t, col[t, k]]        (the SAE's own nonlinearity, per-feature constants)
    c      = (a·f + b) · dir_scale · sigma_t  +  bn · |x_t| / |d|     (sigma_t: per-token decode scale, 1 mostly)
    C      = Σ_k c scattered to column col[t, k]  ([n, W])
    delta  = C @ dec[:W]                          ([n, d])
Entries whose gate is off have c = 0, so they add nothing. An entry with a condition (`when`) is gated by
its condition feature's activation, read like f from the same x: F[t, cond_col[t, k]] above / below a threshold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from steer_plugin.engine.bank import (
    CENTER,
    COLSUM,
    DIR_SCALE,
    GATE_BIAS,
    IN_SCALE,
    INV_DIR_NORM,
    MAG_BIAS,
    MAG_MULT,
    NORM_KIND,
    THRESHOLD,
)
from steer_plugin.request.wire import POSITION_CODES

COEF_A, COEF_B, COEF_BN = range(3)


def token_sigma(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (token, slot) normalisation scales: (divisor on the way in, multiplier on the way out, token mean).

    layer_norm (OpenAI): x_n = (x - mean) / (std + 1e-5) with the unbiased std; decode multiplies by std.
    constant_norm_rescale: x_n = x·sqrt(d)/|x| (x centred first when the SAE centres its input).
    x [n, d] float32, params [n, K, P] -> [n, K], [n, K], [n, 1].
    """
    d = x.shape[-1]
    mean = x.mean(dim=-1, keepdim=True)  # [n, 1]
    norm = x.norm(dim=-1, keepdim=True)  # [n, 1]
    norm_centered = (x - mean).norm(dim=-1, keepdim=True)  # [n, 1]
    kind = params[..., NORM_KIND]  # [n, K]
    centered = params[..., CENTER] > 0  # [n, K]
    rescale = torch.where(centered, norm_centered, norm) / d**0.5
    std = norm_centered / (d - 1) ** 0.5
    ones = torch.ones_like(rescale)
    sigma_out = torch.where(kind == 1, std, torch.where(kind == 2, rescale, ones))
    sigma_in = torch.where(kind == 1, std + 1e-5, sigma_out)
    return sigma_in, sigma_out, mean


def position_gate(
    code: torch.Tensor, last_n: torch.Tensor, pos: torch.Tensor, prompt_len: torch.Tensor
) -> torch.Tensor:
    """Which entries apply. code/last_n [n, K], pos/prompt_len [n] -> [n, K] bool. `generation` means generated
    tokens (position >= prompt length); an unused entry's code (-1) matches nothing."""
    p, plen = pos[:, None], prompt_len[:, None]
    in_prompt = p < plen
    return (
        (code == POSITION_CODES["all"])
        | ((code == POSITION_CODES["prompt"]) & in_prompt)
        | ((code == POSITION_CODES["generation"]) & ~in_prompt)
        | ((code == POSITION_CODES["last_prompt_tokens"]) & in_prompt & (p >= plen - last_n))
    )


def feature_activations(
    x: torch.Tensor, dots: torch.Tensor, params: torch.Tensor, norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations of the entries' features. x [n, d] f32, dots [n, K] (x · encoder row), params [n, K, P] ->
    f [n, K], and the per-entry decode multiplier [n, K] (None: 1, when no entry's SAE normalises, norm=False)."""
    projected = params[..., IN_SCALE] * dots  # [n, K]
    sigma_out = None
    if norm:
        sigma_in, sigma_out, mean = token_sigma(x, params)
        projected = (
            projected - params[..., IN_SCALE] * params[..., CENTER] * mean * params[..., COLSUM]
        ) / sigma_in
    gate = projected + params[..., GATE_BIAS]
    magnitude = params[..., MAG_MULT] * projected + params[..., MAG_BIAS]
    f = torch.relu(magnitude) * (gate > params[..., THRESHOLD])
    return f, sigma_out


class Conditions(NamedTuple):
    """Per-entry conditions (`when`) of a block of tokens."""

    cols: torch.Tensor  # [n, K] int64 working-set column of the condition's feature
    threshold: torch.Tensor  # [n, K] float32
    sign: torch.Tensor  # [n, K] int64: 1 above, -1 below, 0 no condition


class DeltaTerms(NamedTuple):
    """Which parts of the formula some live entry needs (host flags: a False skips that work entirely)."""

    read: bool = True  # an entry reads its feature (clamp, scale, ablate): the x @ enc^T GEMM
    norm: bool = True  # a column's SAE normalises or centres its input: per-token sigma / mean
    bn: bool = True  # a normalised add (coefficient times |x|)
    cond: bool = True  # an entry applies only where a feature is above / below a threshold (`when`)

    @property
    def needs_x(self) -> bool:
        return self.read or self.norm or self.bn or self.cond


ALL_TERMS = DeltaTerms()  # what the fixed-shape (graph-captured) op always computes


def working_set_weights(
    x: torch.Tensor | None,  # [n, d] float32 residual stream after the layer (None when terms need no x)
    cols: torch.Tensor,  # [n, K] int64 working-set columns (< width)
    coef: torch.Tensor,  # [n, K, 3] float32 (a, b, bn)
    applies: torch.Tensor,  # [n, K] bool
    enc: torch.Tensor,  # [W, d] float32 encoder rows
    width: int,  # W
    params: torch.Tensor,  # [W, P] float32
    terms: DeltaTerms = ALL_TERMS,
    conditions: Conditions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C [n, W] float32: how much of each working-set row to add to each token (delta = C @ dec[:W]),
    applies [n, K]: which entries applied, conditions included)."""
    entry_params = params[cols]  # [n, K, P]
    a, b, bn = coef[..., COEF_A], coef[..., COEF_B], coef[..., COEF_BN]
    scores = x @ enc.t() if terms.read or (terms.cond and conditions is not None) else None  # [n, W]
    if terms.cond and conditions is not None:
        cond_f, _ = feature_activations(
            x, scores.gather(1, conditions.cols), params[conditions.cols], terms.norm
        )  # [n, K]
        holds = torch.where(conditions.sign > 0, cond_f > conditions.threshold, cond_f < conditions.threshold)
        applies = applies & ((conditions.sign == 0) | holds)
    if terms.read:
        dots = scores.gather(1, cols)  # [n, W] -> [n, K]
        f, sigma = feature_activations(x, dots, entry_params, terms.norm)
        # where() rather than a product, so that a term with a zero coefficient is exactly zero (not 0·inf).
        c = torch.where(a != 0, a * f, torch.zeros_like(f)) + b
    else:
        sigma = token_sigma(x, entry_params)[1] if terms.norm else None
        c = b
    c = c * entry_params[..., DIR_SCALE]
    if sigma is not None:
        c = c * sigma
    if terms.bn:
        norm = x.norm(dim=-1, keepdim=True)  # [n, 1]
        c = c + torch.where(bn != 0, bn * norm * entry_params[..., INV_DIR_NORM], torch.zeros_like(c))
    c = torch.where(applies, c, torch.zeros_like(c))  # [n, K]
    weights = torch.zeros(cols.shape[0], width, dtype=torch.float32, device=cols.device)  # [n, W]
    return weights.scatter_add_(1, cols, c), applies


def add_delta(residual: torch.Tensor, weights: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """residual [n, d] + weights [n, W] @ dec [W, d] in one GEMM with float32 accumulation, rounded once to the
    residual's dtype (no [n, d] float32 delta is materialised when the bank has the model's dtype)."""
    if residual.dtype == dec.dtype:
        return torch.addmm(residual, weights.to(dec.dtype), dec)
    return (residual.float() + weights @ dec.float()).to(residual.dtype)

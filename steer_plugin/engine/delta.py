"""The steering math on a block of tokens: pure tensor work, no host decisions (safe inside CUDA graphs).

Token t carries K operation entries: a working-set column col[t, k], coefficients (a, b, bn) and a gate (does
the entry apply at this token's position). With W working-set columns (the distinct bank rows in use):
    dots   = x_t · enc[col[t, k]]                 (only when some entry reads a feature; [n, K], float32)
    f      = activation of dots                   (the SAE's own nonlinearity, per-feature constants)
    c      = (a·f + b) · dir_scale · sigma_t  +  bn · |x_t| / |d|     (sigma_t: per-token decode scale, 1 mostly)
    delta  = Σ_k c · dec[col[t, k]]               ([n, d])
Entries whose gate is off have c = 0, so they add nothing. An entry with a condition (`when`) is gated by
its condition feature's activation, read like f from the same x: x_t · enc[cond_col[t, k]] above / below a
threshold. The eager op reads the dots from one GEMM over the working set (F = x @ enc[:W]^T, gathered) and
adds C @ dec[:W] with C = c scattered to the columns (working_set_weights); the fixed-shape op (fixed.py) reads
each entry's own rows. Both compose the same terms (read_term, condition_holds, norm_add_term, combine): the
eager op skips a term on the host (DeltaTerms), the fixed-shape op gates it and uses its neutral value.
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
from steer_plugin.request.ops import POSITION_CODES

COEF_A, COEF_B, COEF_BN = range(3)


class TokenScales(NamedTuple):
    """Per (token, entry) normalisation of the SAE input (all neutral, 1 / 1 / 0, for SAEs that do not
    normalise)."""

    sigma_in: torch.Tensor  # [n, K] divisor on the way in
    sigma_out: torch.Tensor  # [n, K] multiplier on the way out (decode)
    mean: torch.Tensor  # [n, 1] the token's mean (subtracted when the SAE centres its input)


def token_sigma(x: torch.Tensor, params: torch.Tensor) -> TokenScales:
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
    return TokenScales(sigma_in, sigma_out, mean)


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
    dots: torch.Tensor, params: torch.Tensor, scales: TokenScales | None = None
) -> torch.Tensor:
    """Activations of the entries' features. dots [n, K] (x · encoder row), params [n, K, P], scales: the
    token's normalisation (None: no entry's SAE normalises) -> f [n, K]."""
    projected = params[..., IN_SCALE] * dots  # [n, K]
    if scales is not None:
        projected = (
            projected - params[..., IN_SCALE] * params[..., CENTER] * scales.mean * params[..., COLSUM]
        ) / scales.sigma_in
    gate = projected + params[..., GATE_BIAS]
    magnitude = params[..., MAG_MULT] * projected + params[..., MAG_BIAS]
    return torch.relu(magnitude) * (gate > params[..., THRESHOLD])


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


ALL_TERMS = DeltaTerms()  # every term


def read_term(
    dots: torch.Tensor, coef: torch.Tensor, params: torch.Tensor, scales: TokenScales | None
) -> torch.Tensor:
    """a·f [n, K]: the part of each coefficient that reads the entry's own feature (clamp, scale, ablate)."""
    a = coef[..., COEF_A]
    f = feature_activations(dots, params, scales)
    # where() rather than a product, so that a term with a zero coefficient is exactly zero (not 0·inf).
    return torch.where(a != 0, a * f, torch.zeros_like(f))


def condition_holds(
    cond_dots: torch.Tensor, cond_params: torch.Tensor, conditions: Conditions, scales: TokenScales | None
) -> torch.Tensor:
    """[n, K] bool: the entry has no condition, or its condition feature is above / below its threshold."""
    f = feature_activations(cond_dots, cond_params, scales)
    holds = torch.where(conditions.sign > 0, f > conditions.threshold, f < conditions.threshold)
    return (conditions.sign == 0) | holds


def norm_add_term(x: torch.Tensor, coef: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """bn·|x|/|d| [n, K]: a normalised add (the coefficient scales with the token's norm)."""
    bn = coef[..., COEF_BN]
    norm = x.norm(dim=-1, keepdim=True)  # [n, 1]
    return torch.where(bn != 0, bn * norm * params[..., INV_DIR_NORM], torch.zeros_like(bn))


def combine(
    coef: torch.Tensor,
    params: torch.Tensor,
    applies: torch.Tensor,
    read: torch.Tensor | None = None,
    sigma_out: torch.Tensor | None = None,
    norm_add: torch.Tensor | None = None,
) -> torch.Tensor:
    """c [n, K] = (a·f + b) · dir_scale · sigma + bn-term where the entry applies, else 0. A term left out
    (None) and its neutral value (0, 1, 0) give the same c."""
    c = coef[..., COEF_B] if read is None else read + coef[..., COEF_B]
    c = c * params[..., DIR_SCALE]
    if sigma_out is not None:
        c = c * sigma_out
    if norm_add is not None:
        c = c + norm_add
    return torch.where(applies, c, torch.zeros_like(c))


def entry_coefficients(
    x: torch.Tensor | None,  # [n, d] float32 residual stream after the layer (None when terms need no x)
    coef: torch.Tensor,  # [n, K, 3] float32 (a, b, bn)
    applies: torch.Tensor,  # [n, K] bool (position gate)
    entry_params: torch.Tensor,  # [n, K, P] float32 constants of each entry's row
    terms: DeltaTerms = ALL_TERMS,
    dots: torch.Tensor | None = None,  # [n, K] x · encoder row of each entry (read only with terms.read)
    conditions: Conditions | None = None,
    cond_dots: torch.Tensor | None = None,  # [n, K] x · encoder row of each condition's feature
    cond_params: torch.Tensor | None = None,  # [n, K, P] constants of each condition's row
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [n, K] float32: how much of each entry's decoder row to add to its token, applies [n, K]: which
    entries applied, conditions included), the terms that `terms` leaves out skipped on the host."""
    scales = token_sigma(x, entry_params) if terms.norm else None
    if terms.cond and conditions is not None:
        cond_scales = token_sigma(x, cond_params) if terms.norm else None
        applies = applies & condition_holds(cond_dots, cond_params, conditions, cond_scales)
    c = combine(
        coef,
        entry_params,
        applies,
        read_term(dots, coef, entry_params, scales) if terms.read else None,
        None if scales is None else scales.sigma_out,
        norm_add_term(x, coef, entry_params) if terms.bn else None,
    )
    return c, applies


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
    cond = terms.cond and conditions is not None
    scores = x @ enc.t() if terms.read or cond else None  # [n, W]
    c, applies = entry_coefficients(
        x,
        coef,
        applies,
        params[cols],
        terms,
        dots=scores.gather(1, cols) if terms.read else None,
        conditions=conditions,
        cond_dots=scores.gather(1, conditions.cols) if cond else None,
        cond_params=params[conditions.cols] if cond else None,
    )
    weights = torch.zeros(cols.shape[0], width, dtype=torch.float32, device=cols.device)  # [n, W]
    return weights.scatter_add_(1, cols, c), applies


def add_delta(residual: torch.Tensor, weights: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """residual [n, d] + weights [n, W] @ dec [W, d] in one GEMM with float32 accumulation, rounded once to the
    residual's dtype (no [n, d] float32 delta is materialised when the bank has the model's dtype)."""
    if residual.dtype == dec.dtype:
        return torch.addmm(residual, weights.to(dec.dtype), dec)
    return (residual.float() + weights @ dec.float()).to(residual.dtype)

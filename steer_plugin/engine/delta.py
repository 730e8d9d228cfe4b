"""The steering math on a block of tokens: pure tensor work, no host decisions (safe inside CUDA graphs).

Each token row carries K operation slots: a bank row index and coefficients (a, b, bn). For slot k on token t:
    f      = activation of bank row idx[t, k] read from x_t (only that one encoder row: O(K·d) per token)
    c      = (a·f + b) · dir_scale · sigma_t  +  bn · |x_t| / |d|     (sigma_t: per-token decode scale, 1 mostly)
    delta  = Σ_k c · dec[idx[t, k]]
Unused slots have a = b = bn = 0, so they add nothing.
"""

from __future__ import annotations

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


def feature_activations(
    x: torch.Tensor, enc_rows: torch.Tensor, params: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of the slots' features. x [n, d] f32, enc_rows [n, K, d], params [n, K, P] -> f [n, K], and
    the per-slot decode multiplier [n, K]."""
    sigma_in, sigma_out, mean = token_sigma(x, params)
    dots = torch.einsum("nkd,nd->nk", enc_rows.float(), x)  # [n, K]
    dots = dots - params[..., CENTER] * mean * params[..., COLSUM]
    projected = params[..., IN_SCALE] * dots / sigma_in  # [n, K]
    gate = projected + params[..., GATE_BIAS]
    magnitude = params[..., MAG_MULT] * projected + params[..., MAG_BIAS]
    f = torch.relu(magnitude) * (gate > params[..., THRESHOLD])
    return f, sigma_out


def steering_delta(
    x: torch.Tensor,  # [n, d] residual stream after the layer
    idx: torch.Tensor,  # [n, K] int64 bank rows
    coef: torch.Tensor,  # [n, K, 3] float32 (a, b, bn)
    bank_dec: torch.Tensor,  # [N, d]
    bank_enc: torch.Tensor,  # [N, d]
    bank_params: torch.Tensor,  # [N, P]
) -> torch.Tensor:
    """Delta [n, d] (float32) to add to the residual of these tokens."""
    xf = x.float()
    params = bank_params[idx]  # [n, K, P]
    f, sigma = feature_activations(xf, bank_enc[idx], params)  # [n, K]
    norm = xf.norm(dim=-1, keepdim=True)  # [n, 1]
    a, b, bn = coef[..., COEF_A], coef[..., COEF_B], coef[..., COEF_BN]
    # where() rather than a product, so that a term with a zero coefficient is exactly zero (not 0·inf).
    read = torch.where(a != 0, a * f, torch.zeros_like(f))
    normalised = torch.where(bn != 0, bn * norm * params[..., INV_DIR_NORM], torch.zeros_like(f))
    c = (read + b) * params[..., DIR_SCALE] * sigma + normalised  # [n, K]
    return torch.einsum("nk,nkd->nd", c, bank_dec[idx].float())  # [n, d]

"""Pure functions behind the APT optimizers: Newton-Schulz, Muon's lr adjustment, the adaptive
momentum map and direction preservation. Each is a small function of tensors, nothing hidden.

The equations are apt-hf's reading of the APT paper (arXiv 2604.08939); see docs/algorithm.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
BETA_MAPS = ("linear", "relu")
GRANULARITIES = ("tensor", "global")
DIRECTION_PRESERVATION = ("none", "row", "instant")
ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = ("bfloat16", "float32")


def zeropower_via_newtonschulz(
    grad: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Quintic Newton-Schulz: X <- aX + (bA + cA^2)X with A = XX^T, X_0 = G / ||G||_F.

    Orthogonalises a 2-D matrix (singular values pushed to about 1). Transposed when rows > cols so
    the Gram matrix is the small one. Same operation order as ``torch.optim.Muon``, so with
    ``dtype=torch.bfloat16`` the result is bit-identical to it.
    """
    if grad.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)  # our own copy, so normalising in place never touches grad
    transposed = grad.size(0) > grad.size(1)
    if transposed:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def adjusted_lr(lr: float, adjust_lr: str, rows: int, cols: int) -> float:
    """Muon's per-matrix step size on the flattened (rows, cols) shape.

    "original" (Keller Jordan): lr * sqrt(max(1, rows / cols));
    "match_rms_adamw" (Moonshot): lr * 0.2 * sqrt(max(rows, cols)).
    """
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")


def cosine(dot: Tensor, g_sq: Tensor, m_sq: Tensor, eps: float) -> Tensor:
    """c_t = <g, m> / (||g|| ||m|| + eps), and c := 1 where the momentum is still zero (t = 1)."""
    c = dot / (g_sq.sqrt() * m_sq.sqrt() + eps)
    return torch.where(m_sq > 0, c, torch.ones_like(c))


def beta_from_cos(c: Tensor, beta_min: float, beta_max: float, beta_map: str) -> Tensor:
    """beta_t = beta_min + (beta_max - beta_min) * s(c_t); s = (1 + c) / 2 ("linear") or
    max(c, 0) ("relu")."""
    if beta_map == "linear":
        s = (1.0 + c) * 0.5
    elif beta_map == "relu":
        s = c.clamp(min=0.0)
    else:
        raise ValueError(f"beta_map must be one of {BETA_MAPS}, got {beta_map!r}")
    return beta_min + (beta_max - beta_min) * s


def ema_sq_norm(m_sq: Tensor, dot: Tensor, g_sq: Tensor, beta: Tensor | float) -> Tensor:
    """||beta m + (1 - beta) g||^2 from ||m||^2, <g, m> and ||g||^2, without touching m again."""
    one_minus = 1.0 - beta
    return (beta * beta * m_sq + 2.0 * beta * one_minus * dot + one_minus * one_minus * g_sq).clamp(
        min=0.0
    )


def direction_preservation(
    update: Tensor, instant: Tensor, mode: str, gamma: float, eps: float = 1e-8
) -> Tensor:
    """DP(u) before Newton-Schulz, on the flattened 2-D update.

    "none": u; "row": each row of u scaled to unit norm, diag(||u_i|| + eps)^-1 u;
    "instant": u / ||u||_F + gamma * g / ||g||_F, keeping the instant MTL gradient's share.
    """
    if mode == "none":
        return update
    if mode == "row":
        return update / (update.norm(dim=1, keepdim=True) + eps)
    if mode == "instant":
        return update / (update.norm() + eps) + gamma * (instant / (instant.norm() + eps))
    raise ValueError(
        f"direction_preservation must be one of {DIRECTION_PRESERVATION}, got {mode!r}"
    )

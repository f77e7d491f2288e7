"""Muon (Keller Jordan's reference algorithm): EMA momentum, nesterov, quintic Newton-Schulz,
conv weights flattened to (out, -1), lr adjustment on the flattened shape, decoupled weight decay.

It is :class:`~apt_hf.optim.APTMuon` with the adaptive momentum and direction preservation off,
so the plain optimizer and its APT variant share one implementation of the update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .apt import APTMuon
from .functional import NS_COEFFICIENTS, NS_EPS


class Muon(APTMuon):
    """Muon for >= 2-D weights (plus optional ``algorithm="adamw"`` groups).

    On 2-D weights (default ``ns_dtype="bfloat16"``) it is bit-identical to ``torch.optim.Muon``;
    4-D conv weights, which torch's Muon rejects, are flattened to (out, in*kh*kw).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adjust_lr: str = "original",
        *,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        ns_dtype: str = "bfloat16",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            adjust_lr=adjust_lr,
            apt=False,
            direction_preservation="none",
            ns_coefficients=ns_coefficients,
            ns_eps=ns_eps,
            ns_dtype=ns_dtype,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
        )

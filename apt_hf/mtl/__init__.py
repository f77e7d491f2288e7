"""Multi-task-learning methods and per-task gradients (torch + torchjd only).

Usage, in place of ``(loss_a + loss_b).backward()``::

    method = get_method("pcgrad", n_tasks=2)  # build once, reuse at every step
    backward([loss_a, loss_b], model.backbone.parameters(), method)
"""

from .backward import backward
from .jacobian import AUTO_STRATEGY, combine, flatten_rows, gramian, task_jacobian, unflatten
from .methods import (
    DBMTL,
    DWA,
    EW,
    FAMO,
    GLS,
    IMTLG,
    METHODS,
    MGDA,
    RLW,
    UW,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradDrop,
    GradientMethod,
    GradNorm,
    GradVac,
    LossWeighting,
    MTLMethod,
    NashMTL,
    PCGrad,
    UPGrad,
    get_method,
)

__all__ = [
    "AUTO_STRATEGY",
    "DBMTL",
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLG",
    "METHODS",
    "MGDA",
    "RLW",
    "UW",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientMethod",
    "LossWeighting",
    "MTLMethod",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "backward",
    "combine",
    "flatten_rows",
    "get_method",
    "gramian",
    "task_jacobian",
    "unflatten",
]

"""APT optimizers (torch only): AdamW and Muon with adaptive momentum, and the Muon/AdamW split."""

from .apt import ALGORITHMS, APTAdamW, APTMuon, APTOptimizer
from .functional import (
    ADJUST_LR,
    BETA_MAPS,
    DIRECTION_PRESERVATION,
    GRANULARITIES,
    adjusted_lr,
    beta_from_cos,
    cosine,
    direction_preservation,
    zeropower_via_newtonschulz,
)
from .muon import Muon
from .param_groups import ParameterSplit, build_optimizer, no_decay_names, split_parameters

__all__ = [
    "ADJUST_LR",
    "ALGORITHMS",
    "APTAdamW",
    "APTMuon",
    "APTOptimizer",
    "BETA_MAPS",
    "DIRECTION_PRESERVATION",
    "GRANULARITIES",
    "Muon",
    "ParameterSplit",
    "adjusted_lr",
    "beta_from_cos",
    "build_optimizer",
    "cosine",
    "direction_preservation",
    "no_decay_names",
    "split_parameters",
    "zeropower_via_newtonschulz",
]

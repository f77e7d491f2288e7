"""apt-hf: APT (adaptive momentum + direction preservation for AdamW / Muon) and multi-task
learning methods for PyTorch and Hugging Face Transformers."""

from . import mtl, optim
from .mtl import METHODS, backward, get_method, task_jacobian
from .optim import APTAdamW, APTMuon, Muon, build_optimizer, split_parameters

__version__ = "0.1.0.dev0"

__all__ = [
    "METHODS",
    "APTAdamW",
    "APTMuon",
    "Muon",
    "__version__",
    "backward",
    "build_optimizer",
    "get_method",
    "mtl",
    "optim",
    "split_parameters",
    "task_jacobian",
]

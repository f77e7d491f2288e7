"""apt-hf: APT (adaptive momentum + direction preservation for AdamW / Muon) and multi-task
learning methods for PyTorch and Hugging Face Transformers."""

from .optim import APTAdamW, APTMuon, Muon, build_optimizer, split_parameters

__version__ = "0.1.0.dev0"

__all__ = [
    "APTAdamW",
    "APTMuon",
    "Muon",
    "__version__",
    "build_optimizer",
    "split_parameters",
]

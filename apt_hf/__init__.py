"""apt-hf: APT (adaptive momentum + direction preservation for AdamW / Muon) and multi-task
learning methods for PyTorch and Hugging Face Transformers.

Importing it registers ``MultiTaskConfig`` / ``MultiTaskModel`` with ``AutoConfig`` /
``AutoModel``.
"""

from . import metrics, mtl, optim
from .config import APTConfig
from .modeling import MultiTaskConfig, MultiTaskModel, MultiTaskOutput, TaskSpec
from .mtl import METHODS, backward, get_method, task_jacobian
from .optim import APTAdamW, APTMuon, Muon, build_optimizer, split_parameters
from .trainer import APTTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "METHODS",
    "APTAdamW",
    "APTConfig",
    "APTMuon",
    "APTTrainer",
    "Muon",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "TaskSpec",
    "__version__",
    "backward",
    "build_optimizer",
    "get_method",
    "metrics",
    "mtl",
    "optim",
    "split_parameters",
    "task_jacobian",
]

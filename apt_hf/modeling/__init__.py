"""Multi-task models on transformers backbones: task specs, config, heads, model.

Importing this package registers ``MultiTaskConfig`` / ``MultiTaskModel`` with ``AutoConfig`` /
``AutoModel`` (model type ``"apt-multitask"``), so a saved model loads with the Auto classes.
"""

from transformers import AutoConfig, AutoModel

from .configuration import (
    DENSE_TASKS,
    POOLING,
    SEQUENCE_TASKS,
    TASK_LOSSES,
    TASK_TYPES,
    MultiTaskConfig,
    TaskSpec,
)
from .heads import DenseHead, SequenceHead, TokenClassificationHead, check_labels, task_loss
from .modeling import MultiTaskModel, MultiTaskOutput
from .mpnn import MolecularMultiTaskModel, MPNNConfig, MPNNModel  # registers "apt-mpnn"

AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)

__all__ = [
    "DENSE_TASKS",
    "POOLING",
    "SEQUENCE_TASKS",
    "TASK_LOSSES",
    "TASK_TYPES",
    "DenseHead",
    "MPNNConfig",
    "MPNNModel",
    "MolecularMultiTaskModel",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "SequenceHead",
    "TaskSpec",
    "TokenClassificationHead",
    "check_labels",
    "task_loss",
]

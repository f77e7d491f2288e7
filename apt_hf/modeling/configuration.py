"""Task specifications and the multi-task model configuration.

A :class:`TaskSpec` says what one head predicts and how its loss is computed; a
:class:`MultiTaskConfig` holds the backbone's own config (a nested sub-config, saved with its
``model_type``) and one task-spec dict per task, so ``config.json`` alone rebuilds the model.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

TASK_TYPES: tuple[str, ...] = (
    "classification",
    "multilabel",
    "regression",
    "token_classification",
    "segmentation",
    "depth",
    "normals",
)
# Allowed losses per task type; the first one is the default.
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("cross_entropy",),
    "multilabel": ("bce",),
    "regression": ("mse", "l1", "smooth_l1"),
    "token_classification": ("cross_entropy",),
    "segmentation": ("cross_entropy",),
    "depth": ("l1", "mse", "smooth_l1"),
    "normals": ("cosine", "l1"),
}
SEQUENCE_TASKS: tuple[str, ...] = ("classification", "multilabel", "regression")
DENSE_TASKS: tuple[str, ...] = ("segmentation", "depth", "normals")
# Task types predicting one class index per example / token / pixel.
CLASS_INDEX_TASKS: tuple[str, ...] = ("classification", "token_classification", "segmentation")
# Output channels fixed by the task type.
FIXED_NUM_LABELS: dict[str, int] = {"depth": 1, "normals": 3}
POOLING: tuple[str, ...] = ("auto", "pooler", "cls", "mean")
# Keyword arguments of MultiTaskModel.forward that a label column may not shadow.
RESERVED_COLUMNS: frozenset[str] = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels", "return_dict"}
)
# Names a task may not take: they are attributes of the nn.ModuleDict holding the heads.
_MODULE_DICT_ATTRIBUTES: frozenset[str] = frozenset(dir(nn.ModuleDict()))


@dataclass
class TaskSpec:
    """One task: its head type, its output size, its loss and where its labels come from.

    ``num_labels``: classes (classification / token_classification / segmentation, >= 2),
    labels (multilabel, >= 1) or targets (regression, default 1); fixed for depth (1) and
    normals (3). ``loss`` defaults per type (``TASK_LOSSES``). ``weight`` scales the task's loss
    in ``MultiTaskOutput.loss``. Label entries equal to ``ignore_index`` are left out of the
    loss. ``label_column`` (default ``labels_<name>``) is the batch key holding the labels. A
    task with ``allow_missing_labels`` is skipped (no loss) in batches without its labels.
    """

    name: str
    type: str = "classification"
    num_labels: int | None = None
    loss: str | None = None
    weight: float = 1.0
    ignore_index: int = -100
    label_column: str | None = None
    allow_missing_labels: bool = False

    def _invalid(self, field: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"TaskSpec(name={self.name!r}).{field}={value!r} is invalid: {allowed}")

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name.isidentifier()
            or keyword.iskeyword(self.name)
        ):
            raise ValueError(
                f"TaskSpec.name={self.name!r} is invalid: a task name must be a Python identifier "
                "(letters, digits, underscores; not starting with a digit; not a keyword)"
            )
        if self.name in _MODULE_DICT_ATTRIBUTES:
            raise self._invalid("name", self.name, "it clashes with an nn.ModuleDict attribute")
        if self.type not in TASK_TYPES:
            raise self._invalid("type", self.type, f"choose one of {list(TASK_TYPES)}")
        self._check_num_labels()
        allowed_losses = TASK_LOSSES[self.type]
        if self.loss is None:
            self.loss = allowed_losses[0]
        elif self.loss not in allowed_losses:
            raise self._invalid(
                "loss", self.loss, f"a {self.type} task allows {list(allowed_losses)}"
            )
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight < 0
        ):
            raise self._invalid("weight", self.weight, "expected a finite number >= 0")
        self.weight = float(self.weight)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise self._invalid("ignore_index", self.ignore_index, "expected an int")
        if self.type in CLASS_INDEX_TASKS and 0 <= self.ignore_index < self.num_labels:
            raise self._invalid(
                "ignore_index",
                self.ignore_index,
                f"it is a valid class index (0..{self.num_labels - 1}); use a negative value "
                "or one >= num_labels",
            )
        if self.label_column is None:
            self.label_column = f"labels_{self.name}"
        elif not isinstance(self.label_column, str) or not self.label_column:
            raise self._invalid("label_column", self.label_column, "expected a non-empty str")
        if self.label_column in RESERVED_COLUMNS:
            raise self._invalid(
                "label_column",
                self.label_column,
                f"it is a keyword of MultiTaskModel.forward ({sorted(RESERVED_COLUMNS)})",
            )
        if not isinstance(self.allow_missing_labels, bool):
            raise self._invalid(
                "allow_missing_labels", self.allow_missing_labels, "expected a bool"
            )

    def _check_num_labels(self) -> None:
        n = self.num_labels
        if self.type in FIXED_NUM_LABELS:
            fixed = FIXED_NUM_LABELS[self.type]
            if n is not None and n != fixed:
                raise self._invalid("num_labels", n, f"a {self.type} task has {fixed} output(s)")
            self.num_labels = fixed
            return
        if n is None and self.type == "regression":
            self.num_labels = 1
            return
        minimum = 2 if self.type in CLASS_INDEX_TASKS else 1
        what = {
            "multilabel": "the number of labels",
            "regression": "the number of regression targets",
        }.get(self.type, "the number of classes")
        if n is None:
            raise self._invalid("num_labels", n, f"a {self.type} task needs {what} (>= {minimum})")
        if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
            raise self._invalid(
                "num_labels", n, f"expected {what} of a {self.type} task, an int >= {minimum}"
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields, defaults resolved (what ``MultiTaskConfig.tasks`` stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"TaskSpec.from_dict: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"TaskSpec.from_dict: unknown field(s) {unknown} in task "
                f"{data.get('name')!r}; allowed: {sorted(known)}"
            )
        if "name" not in data:
            raise ValueError(f"TaskSpec.from_dict: the field 'name' is required, got {dict(data)}")
        return cls(**data)


def as_task_specs(tasks: list[TaskSpec | Mapping[str, Any]]) -> list[TaskSpec]:
    """Task specs from specs or dicts; names and label columns must be unique."""
    if not isinstance(tasks, (list, tuple)):
        raise TypeError(f"tasks: expected a list of TaskSpec or dicts, got {type(tasks).__name__}")
    specs = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in tasks]
    for field in ("name", "label_column"):
        values = [getattr(s, field) for s in specs]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"tasks: each task needs its own {field}; repeated: {duplicates}")
    return specs


class MultiTaskConfig(PreTrainedConfig):
    """Configuration of a :class:`MultiTaskModel`: one backbone shared by one head per task.

    ``backbone_config``: the backbone's config (any ``AutoModel`` architecture); a dict is
    rebuilt with ``AutoConfig.for_model(**dict)`` and must hold its ``model_type``.
    ``tasks``: ``TaskSpec`` dicts (``TaskSpec`` objects are converted). ``head_hidden_size``:
    hidden width of a two-layer MLP head (None: a linear head). ``head_dropout``: dropout
    before each head layer. ``dense_decoder_channels``: width of the dense heads' decoder.
    ``pooling``: sequence-level input of the heads: "auto" (the backbone's pooler output when
    it has one, else the first token for text backbones, the token / spatial mean for vision
    ones), "pooler", "cls" (first token) or "mean". ``initializer_range``: std of the heads'
    initial weights.
    """

    model_type = "apt-multitask"
    # Trainer's evaluation gathers the per-task logits only (the loss is gathered separately).
    keys_to_ignore_at_inference = ["task_losses"]
    # Transformers' supported way to nest a config: created from a dict / kept as a config,
    # serialised as a dict with its model_type, attention implementation propagated.
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True)
    }

    backbone_config: dict | PreTrainedConfig | None = None
    tasks: list | None = None
    head_hidden_size: int | None = None
    head_dropout: float = 0.1
    dense_decoder_channels: int = 64
    pooling: str = "auto"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.backbone_config, Mapping):
            backbone = dict(self.backbone_config)
            if "model_type" not in backbone:
                raise ValueError(
                    "MultiTaskConfig.backbone_config: a dict needs its 'model_type' (e.g. 'bert', "
                    f"'resnet', 'vit'), got keys {sorted(backbone)}"
                )
            self.backbone_config = AutoConfig.for_model(**backbone)
        elif self.backbone_config is not None and not isinstance(
            self.backbone_config, PreTrainedConfig
        ):
            raise TypeError(
                "MultiTaskConfig.backbone_config: expected a PreTrainedConfig, a dict or None, "
                f"got {type(self.backbone_config).__name__}"
            )
        self.tasks = [s.to_dict() for s in as_task_specs(self.tasks or [])]
        _check_int("head_hidden_size", self.head_hidden_size, optional=True)
        _check_int("dense_decoder_channels", self.dense_decoder_channels)
        for name in ("head_dropout", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"MultiTaskConfig.{name}={value!r} is invalid: expected a float")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(
                f"MultiTaskConfig.head_dropout={self.head_dropout!r} is invalid: expected [0, 1)"
            )
        if not self.initializer_range > 0:
            raise ValueError(
                f"MultiTaskConfig.initializer_range={self.initializer_range!r} is invalid: "
                "expected > 0"
            )
        if self.pooling not in POOLING:
            raise ValueError(
                f"MultiTaskConfig.pooling={self.pooling!r} is invalid: "
                f"choose one of {list(POOLING)}"
            )
        super().__post_init__(**kwargs)

    @property
    def task_specs(self) -> list[TaskSpec]:
        """The tasks as :class:`TaskSpec` objects, in head order."""
        return [TaskSpec.from_dict(t) for t in self.tasks]


def _check_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an int >= 1" + (" or None" if optional else "")
        raise ValueError(f"MultiTaskConfig.{name}={value!r} is invalid: expected {allowed}")

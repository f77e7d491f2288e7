"""GLUE tasks sharing one text encoder, from the hub's ``nyu-mll/glue``.

Layout (the hub repository or a local copy of it, e.g. ``hf download nyu-mll/glue --repo-type
dataset --local-dir DIR``): ``README.md`` whose YAML ``configs:`` block declares one config per
task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) with its data files, and
``<task>/<split>-NNNNN-of-NNNNN.parquet`` with the task's text column(s), ``label`` and ``idx``
(splits train / validation / test; mnli: train / validation_matched / validation_mismatched /
test_matched / test_mismatched).

GLUE's test labels are hidden: every test row has label -1. Rows labelled -1 are dropped from
whatever split is loaded, so they never reach training nor evaluation; a split with no labelled
row (a test split) raises ValueError. Evaluation uses the validation split (mnli:
validation_matched).

Batching: the tasks have different inputs, and every MTL method needs every task's loss at
every step, so one training example of :class:`TaskZip` holds one example *per task* and a batch
of B such examples holds one sub-batch of B per task (``{"task_inputs": {task: {"input_ids",
"attention_mask", "token_type_ids"}}, "labels_<task>": ...}``). :class:`GlueMultiTaskModel` runs
the shared encoder once on the concatenated sub-batches and splits the pooled vectors back into
the tasks' heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..metrics import F1, HIGHER_IS_BETTER, Accuracy, task_delta_m
from ..modeling import MultiTaskModel, MultiTaskOutput, TaskSpec, task_loss
from .hub import load_hub_split

GLUE_HUB_ID = "nyu-mll/glue"
GLUE_LAYOUT = (
    "DIR/README.md with a YAML 'configs:' block (one config_name per task, e.g. sst2, with "
    "data_files for its splits train / validation / test), and "
    "DIR/<task>/<split>-NNNNN-of-NNNNN.parquet with the task's text column(s), label and idx"
)
# Metric directions beyond apt_hf.metrics' (True: higher is better).
GLUE_HIGHER_IS_BETTER: Mapping[str, bool] = MappingProxyType(
    {**HIGHER_IS_BETTER, "matthews_correlation": True, "pearson": True, "spearmanr": True}
)


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text column(s) (two: a sentence pair), its number of classes (1:
    regression), its evaluation split and its official metrics."""

    text_columns: tuple[str, ...]
    num_labels: int
    eval_split: str
    metrics: tuple[str, ...]


GLUE_TASKS: Mapping[str, GlueTask] = MappingProxyType(
    {
        "cola": GlueTask(("sentence",), 2, "validation", ("matthews_correlation",)),
        "sst2": GlueTask(("sentence",), 2, "validation", ("accuracy",)),
        "mrpc": GlueTask(("sentence1", "sentence2"), 2, "validation", ("accuracy", "f1")),
        "qqp": GlueTask(("question1", "question2"), 2, "validation", ("accuracy", "f1")),
        "stsb": GlueTask(("sentence1", "sentence2"), 1, "validation", ("pearson", "spearmanr")),
        "mnli": GlueTask(("premise", "hypothesis"), 3, "validation_matched", ("accuracy",)),
        "qnli": GlueTask(("question", "sentence"), 2, "validation", ("accuracy",)),
        "rte": GlueTask(("sentence1", "sentence2"), 2, "validation", ("accuracy",)),
        "wnli": GlueTask(("sentence1", "sentence2"), 2, "validation", ("accuracy",)),
    }
)
# GLUE's label of the hidden test rows.
HIDDEN_LABEL = -1


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks={tasks!r}: expected a non-empty list of GLUE task names")
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown GLUE task(s) {unknown}; known: {list(GLUE_TASKS)}")
    repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if repeated:
        raise ValueError(f"tasks: repeated {repeated}")
    return list(tasks)


def glue_task_specs(tasks: Sequence[str]) -> list[TaskSpec]:
    """One TaskSpec per GLUE task, named as the task: stsb is a regression with one target,
    the others classifications with their number of classes; labels in ``labels_<task>``."""
    return [
        TaskSpec(name=t, type="regression", num_labels=1)
        if GLUE_TASKS[t].num_labels == 1
        else TaskSpec(name=t, type="classification", num_labels=GLUE_TASKS[t].num_labels)
        for t in _check_tasks(tasks)
    ]


def load_glue_task(
    path: str,
    task: str,
    split: str,
    tokenizer: Any,
    *,
    max_seq_length: int = 128,
    max_samples: int | None = None,
) -> Any:
    """One split of one task, rows labelled -1 (hidden test labels) dropped, then the first
    ``max_samples`` rows kept, tokenized (sentence pairs as pairs, truncated to
    ``max_seq_length``): columns ``input_ids``, ``attention_mask`` (, ``token_type_ids``),
    ``label``. A split without any labelled row raises ValueError."""
    spec = GLUE_TASKS[_check_tasks([task])[0]]
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r}: expected an int >= 1 or None")
    data = load_hub_split(path, task, split, hub_id=GLUE_HUB_ID, layout=GLUE_LAYOUT)
    missing = [c for c in (*spec.text_columns, "label") if c not in data.column_names]
    if missing:
        raise ValueError(
            f"GLUE {path!r} task {task!r} split {split!r} lacks the column(s) {missing} (has "
            f"{data.column_names}). Expected layout: {GLUE_LAYOUT}."
        )
    data = data.filter(
        lambda labels: [label != HIDDEN_LABEL for label in labels],
        input_columns="label",
        batched=True,
    )
    if len(data) == 0:
        raise ValueError(
            f"GLUE task {task!r} split {split!r} has no labelled row (every label is "
            f"{HIDDEN_LABEL}: GLUE hides its test labels); train and evaluate on train / "
            f"{spec.eval_split}"
        )
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    columns = spec.text_columns

    def tokenize(batch: Mapping[str, list]) -> Any:
        return tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_seq_length)

    return data.map(
        tokenize, batched=True, remove_columns=[c for c in data.column_names if c != "label"]
    )


class TaskZip(Dataset):
    """Example i holds example ``i mod n_t`` of every task t (``{"task_inputs": {task: row},
    "<label_column>": label}``), so a batch of them holds one equal-sized sub-batch per task.

    Length: the largest task's n; an epoch sees each of its examples once and cycles the
    smaller tasks. ``mask_repeats`` (evaluation): the cycled entries (i >= n_t) carry the label
    ``ignore_index``, which the loss (:class:`GlueMultiTaskModel`) and the metrics
    (:func:`glue_compute_metrics`) skip; every task is still evaluated on each of its examples
    exactly once, and batches keep equal sub-batches, which gathering across processes needs.
    """

    def __init__(
        self,
        task_specs: Sequence[TaskSpec],
        data: Mapping[str, Any],
        *,
        mask_repeats: bool = False,
    ) -> None:
        self.task_specs = list(task_specs)
        missing = [s.name for s in self.task_specs if s.name not in data]
        if missing:
            raise ValueError(f"TaskZip: no data for task(s) {missing}; got {sorted(data)}")
        empty = [s.name for s in self.task_specs if len(data[s.name]) == 0]
        if empty:
            raise ValueError(f"TaskZip: task(s) {empty} have no example")
        self.data = {s.name: data[s.name] for s in self.task_specs}
        self.mask_repeats = mask_repeats
        self.length = max(len(d) for d in self.data.values())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"task_inputs": {}}
        for spec in self.task_specs:
            rows = self.data[spec.name]
            row = dict(rows[index % len(rows)])
            label = row.pop("label")
            item["task_inputs"][spec.name] = row
            repeated = self.mask_repeats and index >= len(rows)
            item[spec.label_column] = spec.ignore_index if repeated else label
        return item


@dataclass
class TaskZipCollator:
    """Collates :class:`TaskZip` examples: each task's inputs padded by ``tokenizer.pad`` on
    their own (dynamic padding), labels as tensors (long for classification, float for
    regression)."""

    tokenizer: Any
    task_specs: Sequence[TaskSpec]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "task_inputs": {
                spec.name: dict(
                    self.tokenizer.pad(
                        [f["task_inputs"][spec.name] for f in features], return_tensors="pt"
                    )
                )
                for spec in self.task_specs
            }
        }
        for spec in self.task_specs:
            dtype = torch.float32 if spec.type == "regression" else torch.long
            batch[spec.label_column] = torch.tensor(
                [f[spec.label_column] for f in features], dtype=dtype
            )
        return batch


def _concat_sub_batches(sub_batches: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """One batch from per-task sub-batches: right-padded to the longest (pad id 0, attention
    0), concatenated along the batch."""
    length = max(b["input_ids"].shape[1] for b in sub_batches)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    present = [k for k in keys if any(k in b for b in sub_batches)]
    out: dict[str, Tensor] = {}
    for key in present:
        parts = []
        for b in sub_batches:
            ids = b["input_ids"]
            value = b.get(key)
            if value is None:  # no mask: attend everywhere; no segment ids: segment 0
                value = torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
            parts.append(F.pad(value, (0, length - value.shape[1])))
        out[key] = torch.cat(parts)
    return out


class GlueMultiTaskModel(MultiTaskModel):
    """A :class:`MultiTaskModel` whose tasks each bring their own text inputs (GLUE: one
    sentence or sentence pair per task), for classification and regression tasks.

    ``forward(task_inputs={task: {"input_ids", "attention_mask", "token_type_ids"}},
    labels_<task>=...)`` runs the shared encoder once on the sub-batches concatenated along the
    batch (padded to the longest), pools, splits the pooled vectors back per task and applies
    each task's head; it returns the same :class:`MultiTaskOutput` as ``MultiTaskModel``. Label
    entries equal to the spec's ``ignore_index`` are left out of the loss, for regression too
    (padding of :class:`TaskZip`'s evaluation). Same config, weights and ``save_pretrained`` /
    ``from_pretrained`` as ``MultiTaskModel``.
    """

    def __init__(self, config: Any, backbone: Any = None) -> None:
        super().__init__(config, backbone)
        bad = [s.name for s in self.task_specs if s.type not in ("classification", "regression")]
        if bad:
            raise ValueError(
                f"GlueMultiTaskModel: task(s) {bad} are not classification or regression tasks"
            )
        if self.backbone.main_input_name != "input_ids":
            raise ValueError(
                f"GlueMultiTaskModel needs a text backbone (input_ids), got "
                f"{type(self.backbone).__name__} ({self.backbone.main_input_name})"
            )

    def _task_loss(self, spec: TaskSpec, logits: Tensor, labels: Tensor) -> Tensor:
        """``task_loss`` over the entries whose label is not ``ignore_index`` (0 if none)."""
        if not isinstance(labels, Tensor):
            return task_loss(spec, logits, labels)  # raises the TypeError naming the task
        keep = (labels.reshape(labels.shape[0], -1) != spec.ignore_index).all(1)
        if bool(keep.all()):
            return task_loss(spec, logits, labels)
        if not bool(keep.any()):
            return logits.float().sum() * 0.0
        return task_loss(spec, logits[keep], labels[keep])

    def forward(
        self,
        task_inputs: Mapping[str, Mapping[str, Tensor]] | None = None,
        labels: Mapping[str, Tensor] | None = None,
        return_dict: bool | None = None,
        **label_columns: Tensor,
    ) -> MultiTaskOutput | tuple:
        """Logits of every task in ``task_inputs``; the loss of each one with labels. With
        labels for some tasks, every other task needs them too (unless allow_missing_labels)."""
        if not isinstance(task_inputs, Mapping) or not task_inputs:
            raise ValueError(
                "GlueMultiTaskModel.forward: pass task_inputs={task: {'input_ids': ..., "
                f"'attention_mask': ...}} for some of the tasks {self.task_names}"
            )
        unknown = sorted(set(task_inputs) - set(self.task_names))
        if unknown:
            raise ValueError(f"task_inputs: unknown task(s) {unknown}; tasks: {self.task_names}")
        task_labels = self._collect_labels(labels, label_columns)
        no_inputs = sorted(set(task_labels) - set(task_inputs))
        if no_inputs:
            raise ValueError(f"task(s) {no_inputs} have labels but no task_inputs")
        names = [n for n in self.task_names if n in task_inputs]
        for name in names:
            ids = task_inputs[name].get("input_ids")
            if not isinstance(ids, Tensor) or ids.ndim != 2:
                raise ValueError(
                    f"task_inputs[{name!r}]['input_ids'] must be a (batch, sequence) tensor, "
                    f"got {getattr(ids, 'shape', type(ids).__name__)}"
                )
        batch = _concat_sub_batches([task_inputs[n] for n in names])
        outputs = self.backbone(**batch, return_dict=True)
        pooled = self._pool(outputs, batch.get("attention_mask"))
        sizes = [task_inputs[n]["input_ids"].shape[0] for n in names]
        specs = {s.name: s for s in self.task_specs}
        logits: dict[str, Tensor] = {}
        task_losses: dict[str, Tensor] = {}
        for name, features in zip(names, pooled.split(sizes), strict=True):
            logits[name] = self.heads[name](features)
            if name in task_labels:
                task_losses[name] = self._task_loss(specs[name], logits[name], task_labels[name])
        return self._output(task_losses, logits, return_dict)


# ----------------------------------------------------------------------------- metrics
def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation (multi-class form, sklearn's): with the confusion matrix C,
    t = row sums, p = column sums, c = trace, s = total,
    MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)); 0 when the denominator is 0."""
    classes, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    n = len(references)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    t, p = confusion.sum(1), confusion.sum(0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either input is constant."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denominator) if denominator > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def glue_scores(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The official metrics of one GLUE task from its logits and labels (no ignored entry)."""
    if GLUE_TASKS[task].num_labels == 1:
        pred, ref = logits.reshape(-1), labels.reshape(-1)
        return {"pearson": pearson(pred, ref), "spearmanr": spearman(pred, ref)}
    pred, ref = logits.argmax(-1).astype(np.int64), labels.astype(np.int64)
    out: dict[str, float] = {}
    for metric in GLUE_TASKS[task].metrics:
        if metric == "accuracy":
            out.update(Accuracy().compute(predictions=pred, references=ref))
        elif metric == "f1":
            out.update(F1(average="binary").compute(predictions=pred, references=ref))
        else:
            out[metric] = matthews_correlation(pred, ref)
    return out


def glue_compute_metrics(
    task_specs: Sequence[TaskSpec], baselines: Mapping[str, float] | None = None
) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``APTTrainer`` on :class:`TaskZip` evaluation data: per task
    its official GLUE metrics as ``<task>/<metric>`` (accuracy; + f1 for mrpc / qqp;
    matthews_correlation for cola; pearson, spearmanr for stsb), entries labelled
    ``ignore_index`` skipped; ``glue_score``, the mean over tasks of each task's mean metric
    (the leaderboard's average); ``delta_m`` when ``baselines`` ({"<task>/<metric>": value})
    are given."""
    specs = list(task_specs)
    _check_tasks([s.name for s in specs])

    def compute_metrics(prediction: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        task_means = []
        for spec in specs:
            logits = np.asarray(prediction.predictions[spec.name], dtype=np.float64)
            labels = np.asarray(prediction.label_ids[spec.name])
            keep = labels.reshape(len(labels), -1)[:, 0] != spec.ignore_index
            scores = glue_scores(spec.name, logits[keep], labels[keep])
            out.update({f"{spec.name}/{k}": v for k, v in scores.items()})
            task_means.append(float(np.mean(list(scores.values()))))
        out["glue_score"] = float(np.mean(task_means))
        if baselines:
            out["delta_m"] = task_delta_m(out, baselines, GLUE_HIGHER_IS_BETTER)
        return out

    return compute_metrics


def glue_datasets(
    path: str,
    tasks: Sequence[str],
    tokenizer: Any,
    *,
    max_seq_length: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[list[TaskSpec], TaskZip, TaskZip]:
    """Task specs, training :class:`TaskZip` (train splits) and evaluation :class:`TaskZip`
    (validation / validation_matched, repeats masked) of ``tasks``; sample caps per task."""
    specs = glue_task_specs(tasks)
    kwargs = {"max_seq_length": max_seq_length}
    train = {
        s.name: load_glue_task(
            path, s.name, "train", tokenizer, max_samples=max_train_samples, **kwargs
        )
        for s in specs
    }
    evaluation = {
        s.name: load_glue_task(
            path,
            s.name,
            GLUE_TASKS[s.name].eval_split,
            tokenizer,
            max_samples=max_eval_samples,
            **kwargs,
        )
        for s in specs
    }
    return specs, TaskZip(specs, train), TaskZip(specs, evaluation, mask_repeats=True)

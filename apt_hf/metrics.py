"""Per-task metrics and Delta_m%, offline.

Every metric is an ``evaluate.Metric`` subclass shipped in the package (``evaluate.load`` needs
the Hub): ``Metric().compute(predictions=..., references=...)`` or ``add_batch`` then
``compute()``. Options are constructor arguments; the small metrics also take them in
``compute`` as overrides, as evaluate's own scripts do.

Two storage schemes. Accuracy, F1, MultilabelF1 and RegressionErrors keep evaluate's Arrow cache
(inputs are small; multi-process gathering works as in evaluate). The dense metrics
(segmentation, depth, normals) would store every pixel there (NYUv2 val: 72M labels, 217M normal
components), so they are thin wrappers over plain accumulators (``SegmentationAccumulator``,
``DepthAccumulator``, ``NormalAccumulator``: ``update(pred, target)``, ``compute()``,
``reset()``) that keep only sufficient statistics: a confusion matrix, sums, and a histogram of
angles for the median. They accumulate in the calling process only.

Fractions stay fractions (accuracy, mIoU, pixel accuracy, % within t deg as 0..1); angles are in
degrees. The published baselines below are stored in these units (tables' percentages / 100);
Delta_m is a relative change, so the units cancel.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import datasets
import evaluate
import numpy as np

__all__ = [
    "CITYSCAPES_BASELINE",
    "HIGHER_IS_BETTER",
    "NORMAL_ANGLE_RESOLUTION",
    "NORMAL_THRESHOLDS",
    "NYUV2_BASELINE",
    "TASK_METRICS",
    "Accuracy",
    "DepthAccumulator",
    "DepthErrors",
    "F1",
    "MultilabelF1",
    "NormalAccumulator",
    "NormalErrors",
    "RegressionErrors",
    "SegmentationAccumulator",
    "SegmentationMetrics",
    "delta_m",
    "metric_for_task_type",
    "multitask_compute_metrics",
    "task_delta_m",
]

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
NORMAL_ANGLE_RESOLUTION = 0.01  # degrees per histogram bin of the median angle

# Direction of every metric name this module emits (True: higher is better).
HIGHER_IS_BETTER: Mapping[str, bool] = MappingProxyType(
    {
        "accuracy": True,
        "f1": True,
        "mae": False,
        "rmse": False,
        "miou": True,
        "pixel_acc": True,
        "abs_err": False,
        "rel_err": False,
        "mean_angle": False,
        "median_angle": False,
        **{f"within_{t:g}": True for t in NORMAL_THRESHOLDS},
    }
)

# Single-task baselines (docs/benchmarks.md; MTAN / Nash-MTL tables, percentages / 100).
NYUV2_BASELINE: Mapping[str, float] = MappingProxyType(
    {
        "miou": 0.3830,
        "pixel_acc": 0.6376,
        "abs_err": 0.6754,
        "rel_err": 0.2780,
        "mean_angle": 25.01,
        "median_angle": 19.21,
        "within_11.25": 0.3014,
        "within_22.5": 0.5720,
        "within_30": 0.6915,
    }
)
CITYSCAPES_BASELINE: Mapping[str, float] = MappingProxyType(
    {"miou": 0.7401, "pixel_acc": 0.9316, "abs_err": 0.0125, "rel_err": 27.77}
)

_MODULE_KWARGS = frozenset(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {
    "self",
    "kwargs",
}


def _scalar_or_sequence(dtype: str) -> list[datasets.Features]:
    """One value per example, or one sequence per example (tokens, targets, labels)."""
    return [
        datasets.Features(
            {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
        ),
        datasets.Features(
            {
                "predictions": datasets.Sequence(datasets.Value(dtype)),
                "references": datasets.Sequence(datasets.Value(dtype)),
            }
        ),
    ]


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor on any device (half floats as float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _rows(name: str, column: Sequence[Any]) -> np.ndarray:
    """A 2-D array from a column of equal-length sequences."""
    lengths = {len(row) for row in column}
    if len(lengths) > 1:
        raise ValueError(
            f"{name} rows must all have the same length, got lengths {sorted(lengths)}"
        )
    return np.asarray(column, dtype=np.float64).reshape(len(column), -1)


def _valid_labels(
    predictions: Sequence[Any], references: Sequence[Any], ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (prediction, reference) label pairs whose reference is not ignore_index."""
    if predictions and isinstance(predictions[0], list):
        for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
            if len(p) != len(r):
                raise ValueError(f"example {i}: {len(p)} predictions for {len(r)} references")
        predictions = [x for row in predictions for x in row]
        references = [x for row in references for x in row]
    p = np.asarray(predictions, dtype=np.int64)
    r = np.asarray(references, dtype=np.int64)
    keep = r != ignore_index
    if not keep.any():
        raise ValueError(f"no reference differs from ignore_index={ignore_index}")
    return p[keep], r[keep]


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (2 TP + FP + FN), 0 where the denominator is 0 (sklearn's zero_division=0)."""
    denominator = 2 * tp + fp + fn
    return np.divide(2.0 * tp, denominator, out=np.zeros(denominator.shape), where=denominator > 0)


class _Metric(evaluate.Metric):
    """evaluate.Metric whose description is the class docstring and that refuses unknown
    constructor arguments (evaluate itself drops them silently)."""

    _features: ClassVar[list[datasets.Features] | datasets.Features]
    _inputs: ClassVar[str]

    def __init__(self, **module_kwargs: Any) -> None:
        unknown = sorted(set(module_kwargs) - _MODULE_KWARGS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {unknown}; "
                f"evaluate.Metric arguments are {sorted(_MODULE_KWARGS)}"
            )
        super().__init__(**module_kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=inspect.getdoc(self) or "",
            citation="",
            inputs_description=self._inputs,
            features=self._features,
        )


class Accuracy(_Metric):
    """Fraction of correct labels, entries whose reference is ``ignore_index`` skipped.

    accuracy = (1/|V|) sum_{i in V} [p_i = y_i],  V = {i : y_i != ignore_index}
    """

    _features = _scalar_or_sequence("int64")
    _inputs = """
    predictions: labels, one per example or one sequence per example (tokens).
    references: labels of the same shape; ignore_index entries (padding, -100) are skipped.
    ignore_index (compute override): int.
    Returns {"accuracy": float in [0, 1]}.
    """

    def __init__(self, *, ignore_index: int = -100, **module_kwargs: Any) -> None:
        self.ignore_index = ignore_index
        super().__init__(**module_kwargs)

    def _compute(
        self, predictions: Sequence[Any], references: Sequence[Any], ignore_index: int | None = None
    ) -> dict[str, float]:
        ignore = self.ignore_index if ignore_index is None else ignore_index
        p, r = _valid_labels(predictions, references, ignore)
        return {"accuracy": float(np.mean(p == r))}


class F1(_Metric):
    """F1 score of single-label classification: F1 = 2 TP / (2 TP + FP + FN).

    average: "binary" (the class ``pos_label``; at most two classes), "macro" (unweighted mean
    over the classes seen in predictions or references), "micro" (TP, FP, FN pooled over classes;
    equals accuracy for single-label data). A class with 2 TP + FP + FN = 0 has F1 0.
    """

    AVERAGES: ClassVar[tuple[str, ...]] = ("binary", "macro", "micro")
    _features = _scalar_or_sequence("int64")
    _inputs = """
    predictions: labels, one per example or one sequence per example.
    references: labels of the same shape; ignore_index entries are skipped.
    average, pos_label, ignore_index (compute overrides).
    Returns {"f1": float in [0, 1]}.
    """

    def __init__(
        self,
        *,
        average: str = "binary",
        pos_label: int = 1,
        ignore_index: int = -100,
        **module_kwargs: Any,
    ) -> None:
        self._check_average(average)
        self.average = average
        self.pos_label = pos_label
        self.ignore_index = ignore_index
        super().__init__(**module_kwargs)

    def _check_average(self, average: str) -> None:
        if average not in self.AVERAGES:
            raise ValueError(f"average={average!r}; allowed: {list(self.AVERAGES)}")

    def _compute(
        self,
        predictions: Sequence[Any],
        references: Sequence[Any],
        average: str | None = None,
        pos_label: int | None = None,
        ignore_index: int | None = None,
    ) -> dict[str, float]:
        average = self.average if average is None else average
        self._check_average(average)
        pos_label = self.pos_label if pos_label is None else pos_label
        ignore = self.ignore_index if ignore_index is None else ignore_index
        p, r = _valid_labels(predictions, references, ignore)
        classes = np.union1d(p, r)
        if average == "binary":
            if len(classes) > 2:
                raise ValueError(
                    f"average='binary' needs at most two classes, got {classes.tolist()}; "
                    "use average='macro' or 'micro'"
                )
            classes = np.array([pos_label])
        hit_p = p[:, None] == classes
        hit_r = r[:, None] == classes
        tp = (hit_p & hit_r).sum(0)
        fp = (hit_p & ~hit_r).sum(0)
        fn = (~hit_p & hit_r).sum(0)
        if average == "micro":
            return {"f1": float(_f1(tp.sum(), fp.sum(), fn.sum()))}
        return {"f1": float(_f1(tp, fp, fn).mean())}


class MultilabelF1(_Metric):
    """Per-label F1 of multi-label predictions and its mean over the L labels.

    F1_l = 2 TP_l / (2 TP_l + FP_l + FN_l),  f1 = (1/L) sum_l F1_l.
    predictions (N, L) are scores, positive where score >= threshold (0.5 fits probabilities and
    0/1 predictions; pass threshold=0.0 for logits); references (N, L) are 0/1. A label with zero
    support (no positive reference) has F1 0: by the formula if anything is predicted positive,
    by definition (0/0 := 0, sklearn's zero_division=0) if nothing is. It counts in the mean.
    """

    _features = datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value("float64")),
            "references": datasets.Sequence(datasets.Value("int64")),
        }
    )
    _inputs = """
    predictions: (N, L) scores or 0/1 predictions.
    references: (N, L) 0/1 labels.
    threshold (compute override): float, positive where score >= threshold.
    Returns {"f1": mean over labels, "f1_per_label": list of L floats}.
    """

    def __init__(self, *, threshold: float = 0.5, **module_kwargs: Any) -> None:
        self.threshold = threshold
        super().__init__(**module_kwargs)

    def _compute(
        self,
        predictions: Sequence[Sequence[float]],
        references: Sequence[Sequence[int]],
        threshold: float | None = None,
    ) -> dict[str, Any]:
        threshold = self.threshold if threshold is None else threshold
        scores = _rows("predictions", predictions)
        labels = _rows("references", references)
        if scores.shape != labels.shape:
            raise ValueError(
                f"predictions {scores.shape} and references {labels.shape} differ in shape"
            )
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("references must be 0/1")
        hit_p = scores >= threshold
        hit_r = labels == 1
        per_label = _f1((hit_p & hit_r).sum(0), (hit_p & ~hit_r).sum(0), (~hit_p & hit_r).sum(0))
        return {"f1": float(per_label.mean()), "f1_per_label": per_label.tolist()}


class RegressionErrors(_Metric):
    """Mean absolute and root-mean-square errors, scaled: e = s (p - y).

    MAE = mean |e|, RMSE = sqrt(mean e^2). With 2-D references (N, T) the errors are per target
    ("mae_per_target", "rmse_per_target") and "mae" / "rmse" are their means over targets.
    ``scale`` s, a float or T floats, reports errors in original units (e.g. 1000 for eV -> meV).
    """

    _features = _scalar_or_sequence("float64")
    _inputs = """
    predictions: one value per example, or one sequence of T targets per example.
    references: the same shape.
    scale (compute override): positive float or T positive floats multiplying the errors.
    Returns {"mae", "rmse"} (+ "mae_per_target", "rmse_per_target" lists for 2-D inputs).
    """

    def __init__(self, *, scale: float | Sequence[float] = 1.0, **module_kwargs: Any) -> None:
        self.scale = scale
        super().__init__(**module_kwargs)

    def _compute(
        self,
        predictions: Sequence[Any],
        references: Sequence[Any],
        scale: float | Sequence[float] | None = None,
    ) -> dict[str, Any]:
        scale = np.asarray(self.scale if scale is None else scale, dtype=np.float64)
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"scale={scale.tolist()}; must be finite and positive")
        per_target = bool(predictions) and isinstance(predictions[0], list)
        p, r = (
            (_rows("predictions", predictions), _rows("references", references))
            if per_target
            else (np.asarray(predictions, np.float64), np.asarray(references, np.float64))
        )
        if p.shape != r.shape:
            raise ValueError(f"predictions {p.shape} and references {r.shape} differ in shape")
        if scale.ndim > 0 and not per_target:
            raise ValueError(f"scale has {scale.size} entries but references are 1-D; give a float")
        if scale.ndim > 0 and scale.shape != (p.shape[1],):
            raise ValueError(f"scale has {scale.size} entries for {p.shape[1]} targets")
        errors = (p - r) * scale
        mae = np.abs(errors).mean(0)
        rmse = np.sqrt((errors**2).mean(0))
        if not per_target:
            return {"mae": float(mae), "rmse": float(rmse)}
        return {
            "mae": float(mae.mean()),
            "rmse": float(rmse.mean()),
            "mae_per_target": mae.tolist(),
            "rmse_per_target": rmse.tolist(),
        }


class SegmentationAccumulator:
    """mIoU and pixel accuracy from a confusion matrix C (rows: reference, columns: prediction).

    C counts the pixels whose reference is not ``ignore_index``.
    IoU_c = C_cc / (sum_j C_cj + sum_i C_ic - C_cc);  mIoU = mean of IoU_c over the classes
    present in the references or the predictions (a class absent from both has IoU 0/0 and is
    left out of the mean, reported as NaN in "iou_per_class");  pixel_acc = trace(C) / sum(C).
    Pooled over all pixels seen (MTAN's ConfMatrix does the same over an epoch).
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}; must be a positive int")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: pred is labels shaped like target, or scores with the class axis at 1."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"target must hold integer labels, got dtype {target.dtype}")
        if pred.ndim == target.ndim + 1:
            if pred.shape[1] != self.num_classes or np.delete(pred.shape, 1).tolist() != list(
                target.shape
            ):
                raise ValueError(
                    f"scores {pred.shape} must be target {target.shape} with a class axis of "
                    f"{self.num_classes} at position 1"
                )
            pred = pred.argmax(1)
        elif pred.shape != target.shape:
            raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
        elif not np.issubdtype(pred.dtype, np.integer):
            raise TypeError(f"pred labels must be integers, got dtype {pred.dtype}")
        valid = target != self.ignore_index
        t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
        for name, labels in (("target", t), ("pred", p)):
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if bad.size:
                raise ValueError(
                    f"{name} label {bad[0]} outside 0..{self.num_classes - 1} "
                    f"(ignore_index={self.ignore_index})"
                )
        counts = np.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Any]:
        total = self.confusion.sum()
        if total == 0:
            raise ValueError("no labelled pixel accumulated")
        hits = np.diag(self.confusion)
        union = self.confusion.sum(0) + self.confusion.sum(1) - hits
        iou = np.divide(hits, union, out=np.full(self.num_classes, np.nan), where=union > 0)
        return {
            "miou": float(np.nanmean(iou)),
            "pixel_acc": float(hits.sum() / total),
            "iou_per_class": iou.tolist(),
        }


class DepthAccumulator:
    """Absolute and relative depth errors over valid pixels V = {target != 0} (0: missing).

    abs_err = (1/|V|) sum_V |p - y|,  rel_err = (1/|V|) sum_V |p - y| / y.
    Pooled over all valid pixels seen (MTAN averages per-batch values instead; equal when every
    batch has as many valid pixels).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch; pred and target share one shape, e.g. (N, 1, H, W)."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
        valid = target != 0
        p, y = pred[valid].astype(np.float64), target[valid].astype(np.float64)
        if not (np.isfinite(p).all() and np.isfinite(y).all()):
            raise ValueError("pred or target has a non-finite value at a valid pixel")
        error = np.abs(p - y)
        self.abs_sum += float(error.sum())
        self.rel_sum += float((error / y).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no valid depth pixel (target != 0) accumulated")
        return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


class NormalAccumulator:
    """Angular errors (degrees) of surface normals over valid pixels V = {||target|| > 0}.

    theta = degrees(arccos(clip(<p / ||p||, y / ||y||>, -1, 1))); mean and median theta, and
    the fraction of V with theta < t for t in NORMAL_THRESHOLDS. Mean and fractions are exact;
    the median comes from a histogram with NORMAL_ANGLE_RESOLUTION (0.01 deg) bins, each value
    read at its bin centre, so it is within 0.005 deg of numpy's median. A zero prediction
    counts as 90 deg.
    """

    _bins = round(180.0 / NORMAL_ANGLE_RESOLUTION)

    def __init__(self, channel_axis: int = 1) -> None:
        self.channel_axis = channel_axis
        self.reset()

    def reset(self) -> None:
        self.angle_sum = 0.0
        self.count = 0
        self.within = np.zeros(len(NORMAL_THRESHOLDS), dtype=np.int64)
        self.histogram = np.zeros(self._bins, dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch; pred and target share one shape with 3 channels at ``channel_axis``."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
        if not -pred.ndim <= self.channel_axis < pred.ndim or pred.shape[self.channel_axis] != 3:
            raise ValueError(
                f"normals {pred.shape} need 3 channels at channel_axis={self.channel_axis}"
            )
        p = np.moveaxis(pred, self.channel_axis, -1).reshape(-1, 3).astype(np.float64)
        y = np.moveaxis(target, self.channel_axis, -1).reshape(-1, 3).astype(np.float64)
        y_norm = np.linalg.norm(y, axis=1)
        valid = y_norm > 0
        p, y, y_norm = p[valid], y[valid], y_norm[valid]
        if not (np.isfinite(p).all() and np.isfinite(y).all()):
            raise ValueError("pred or target has a non-finite value at a valid pixel")
        p_norm = np.linalg.norm(p, axis=1)
        cosine = np.divide((p * y).sum(1), p_norm * y_norm, out=np.zeros(len(p)), where=p_norm > 0)
        theta = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
        self.angle_sum += float(theta.sum())
        self.count += len(theta)
        self.within += (theta[:, None] < np.asarray(NORMAL_THRESHOLDS)).sum(0)
        bins = np.minimum((theta / NORMAL_ANGLE_RESOLUTION).astype(np.int64), self._bins - 1)
        self.histogram += np.bincount(bins, minlength=self._bins)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no valid normal pixel (||target|| > 0) accumulated")
        middle = np.searchsorted(
            np.cumsum(self.histogram), [self.count // 2 + 1, (self.count + 1) // 2]
        )
        return {
            "mean_angle": self.angle_sum / self.count,
            "median_angle": float((middle.mean() + 0.5) * NORMAL_ANGLE_RESOLUTION),
            **{
                f"within_{t:g}": float(n / self.count)
                for t, n in zip(NORMAL_THRESHOLDS, self.within, strict=True)
            },
        }


class _DenseMetric(_Metric):
    """evaluate.Metric over an accumulator of sufficient statistics instead of the Arrow cache."""

    accumulator: SegmentationAccumulator | DepthAccumulator | NormalAccumulator
    _features = datasets.Features(  # descriptive only: inputs never reach Arrow
        {
            "predictions": datasets.Sequence(datasets.Value("float32")),
            "references": datasets.Sequence(datasets.Value("float32")),
        }
    )

    def __init__(self, **module_kwargs: Any) -> None:
        if module_kwargs.get("num_process", 1) != 1:
            raise ValueError(
                f"{type(self).__name__} accumulates in its own process (num_process="
                f"{module_kwargs['num_process']}); gather predictions first, e.g. with "
                "accelerate's gather_for_metrics, or sum the accumulators' statistics"
            )
        super().__init__(**module_kwargs)

    def add_batch(self, *, predictions: Any, references: Any) -> None:
        """Accumulate a batch of dense predictions and references."""
        self.accumulator.update(predictions, references)

    def add(self, *, prediction: Any, reference: Any) -> None:
        """Accumulate one example (no batch axis)."""
        self.accumulator.update(_to_numpy(prediction)[None], _to_numpy(reference)[None])

    def compute(self, *, predictions: Any = None, references: Any = None) -> dict[str, Any]:
        """Metrics over everything accumulated, this batch included if given; then reset."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        try:
            return self.accumulator.compute()
        finally:
            self.accumulator.reset()


class SegmentationMetrics(_DenseMetric):
    __doc__ = SegmentationAccumulator.__doc__
    _inputs = """
    predictions: (N, ...) integer labels, or (N, num_classes, ...) scores (argmax taken).
    references: (N, ...) integer labels; ignore_index (default -1, MTAN's files) is skipped.
    Returns {"miou", "pixel_acc"} in [0, 1] and "iou_per_class" (NaN for absent classes).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = -1, **module_kwargs: Any) -> None:
        self.accumulator = SegmentationAccumulator(num_classes, ignore_index)
        super().__init__(**module_kwargs)


class DepthErrors(_DenseMetric):
    __doc__ = DepthAccumulator.__doc__
    _inputs = """
    predictions: depth maps, e.g. (N, 1, H, W).
    references: depth maps of the same shape, 0 where missing.
    Returns {"abs_err", "rel_err"}.
    """

    def __init__(self, **module_kwargs: Any) -> None:
        self.accumulator = DepthAccumulator()
        super().__init__(**module_kwargs)


class NormalErrors(_DenseMetric):
    __doc__ = NormalAccumulator.__doc__
    _inputs = """
    predictions: normals with 3 channels at channel_axis (default 1: (N, 3, H, W)).
    references: the same shape, (0, 0, 0) where invalid.
    Returns {"mean_angle", "median_angle"} in degrees and "within_11.25", "within_22.5",
    "within_30" in [0, 1].
    """

    def __init__(self, *, channel_axis: int = 1, **module_kwargs: Any) -> None:
        self.accumulator = NormalAccumulator(channel_axis)
        super().__init__(**module_kwargs)


TASK_METRICS: Mapping[str, type[evaluate.Metric]] = MappingProxyType(
    {
        "classification": Accuracy,
        "multilabel": MultilabelF1,
        "regression": RegressionErrors,
        "token_classification": Accuracy,
        "segmentation": SegmentationMetrics,
        "depth": DepthErrors,
        "normals": NormalErrors,
    }
)


def metric_for_task_type(task_type: str, **kwargs: Any) -> evaluate.Metric:
    """The metric of a task type (TASK_METRICS), built with ``kwargs``."""
    if task_type not in TASK_METRICS:
        raise ValueError(f"task_type={task_type!r}; known task types: {sorted(TASK_METRICS)}")
    return TASK_METRICS[task_type](**kwargs)


def delta_m(
    metrics: Mapping[str, float],
    baselines: Mapping[str, float],
    higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER,
) -> float:
    """Delta_m% of a multi-task model against single-task baselines (lower is better).

    Delta_m = (100 / K) sum_k (-1)^{d_k} (M_m,k - M_b,k) / M_b,k,  d_k = 1 if higher is better,
    over the K metrics named in ``baselines`` (other entries of ``metrics`` are ignored). This is
    the MTAN / Nash-MTL definition, not LibMTL's per-task average.
    """
    if not baselines:
        raise ValueError("baselines is empty")
    total = 0.0
    for name, base in baselines.items():
        if name not in metrics:
            raise ValueError(f"metric {name!r} is missing from metrics (have {sorted(metrics)})")
        if name not in higher_is_better:
            raise ValueError(f"metric {name!r} has no direction in higher_is_better")
        if not isinstance(higher_is_better[name], bool):
            raise TypeError(f"higher_is_better[{name!r}]={higher_is_better[name]!r}; not a bool")
        value = metrics[name]
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r}={value} is not finite")
        if base == 0 or not math.isfinite(base):
            raise ValueError(f"baseline of metric {name!r} is {base}; must be finite and nonzero")
        sign = -1.0 if higher_is_better[name] else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(baselines)


_DENSE_ACCUMULATORS: Mapping[str, Callable[[Any], Any]] = MappingProxyType(
    {
        "segmentation": lambda spec: SegmentationAccumulator(
            int(spec.num_labels), ignore_index=getattr(spec, "ignore_index", -1)
        ),
        "depth": lambda spec: DepthAccumulator(),
        "normals": lambda spec: NormalAccumulator(),
    }
)
_SEQUENCE_TYPES = ("classification", "token_classification", "multilabel", "regression")


class _TaskScore:
    """One task's ready-made metrics, fed batch by batch or all at once.

    Dense tasks keep their accumulator's sufficient statistics; token classification keeps hit
    and valid counts (sequence lengths differ between batches); the other sequence tasks keep
    their (small) logits and labels and are scored once at the end.
    """

    def __init__(self, spec: Any) -> None:
        if spec.type not in _SEQUENCE_TYPES and spec.type not in _DENSE_ACCUMULATORS:
            raise ValueError(f"task_type={spec.type!r}; known task types: {sorted(TASK_METRICS)}")
        self.spec = spec
        self.ignore = getattr(spec, "ignore_index", -100)
        self.reset()

    def reset(self) -> None:
        make = _DENSE_ACCUMULATORS.get(self.spec.type)
        self.dense = make(self.spec) if make is not None else None
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.hits = self.valid = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        if self.dense is not None:
            self.dense.update(logits, labels)
        elif self.spec.type == "token_classification":
            valid = labels != self.ignore
            self.hits += int((logits.argmax(-1)[valid] == labels[valid]).sum())
            self.valid += int(valid.sum())
        else:
            self.logits.append(logits)
            self.labels.append(labels)

    def compute(self) -> dict[str, float]:
        if self.dense is not None:
            return {k: v for k, v in self.dense.compute().items() if isinstance(v, float)}
        if self.spec.type == "token_classification":
            return {"accuracy": self.hits / max(self.valid, 1)}
        logits, labels = np.concatenate(self.logits), np.concatenate(self.labels)
        if self.spec.type == "classification":
            pred = logits.argmax(-1)
            out = Accuracy(ignore_index=self.ignore).compute(predictions=pred, references=labels)
            average = "binary" if logits.shape[-1] == 2 else "macro"
            out.update(
                F1(average=average, ignore_index=self.ignore).compute(
                    predictions=pred, references=labels
                )
            )
            return out
        if self.spec.type == "multilabel":
            scores = 1.0 / (1.0 + np.exp(-logits))
            out = MultilabelF1(threshold=0.5).compute(
                predictions=scores, references=(labels == 1).astype(np.int64)
            )
            return {"f1": out["f1"]}
        out = RegressionErrors().compute(
            predictions=logits.reshape(labels.shape), references=labels
        )
        return {"mae": out["mae"], "rmse": out["rmse"]}


def multitask_compute_metrics(
    task_specs: Sequence[Any],
    baselines: Mapping[str, float] | None = None,
    higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER,
) -> Callable[..., dict[str, float]]:
    """A ``compute_metrics`` for ``APTTrainer``: per task, the metrics of its type, named
    ``<task>/<metric>`` (classification: accuracy, f1; multilabel: f1; regression: mae, rmse;
    token classification: accuracy; segmentation: miou, pixel_acc; depth: abs_err, rel_err;
    normals: angle statistics), plus ``delta_m`` when ``baselines`` ({"<task>/<metric>": value})
    are given (direction looked up by the metric part of the name).

    It also works with ``batch_eval_metrics=True`` (Trainer then calls it per batch with
    ``compute_result`` False until the last): dense tasks then never hold the whole evaluation
    set's logits, only their accumulators.
    """
    scores = [_TaskScore(spec) for spec in task_specs]

    def compute_metrics(prediction: Any, compute_result: bool = True) -> dict[str, float]:
        for score in scores:
            score.update(
                _to_numpy(prediction.predictions[score.spec.name]),
                _to_numpy(prediction.label_ids[score.spec.name]),
            )
        if not compute_result:
            return {}
        out: dict[str, float] = {}
        for score in scores:
            out.update({f"{score.spec.name}/{k}": v for k, v in score.compute().items()})
            score.reset()
        if baselines:
            out["delta_m"] = task_delta_m(out, baselines, higher_is_better)
        return out

    return compute_metrics


def task_delta_m(
    metrics: Mapping[str, float],
    baselines: Mapping[str, float],
    higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER,
) -> float:
    """:func:`delta_m` over ``"<task>/<metric>"`` names, each metric's direction looked up by
    the part after the last "/" (a name with no known direction raises ValueError)."""
    directions = {
        name: higher_is_better[name.rsplit("/", 1)[-1]]
        for name in baselines
        if name.rsplit("/", 1)[-1] in higher_is_better
    }
    return delta_m(metrics, baselines, directions)

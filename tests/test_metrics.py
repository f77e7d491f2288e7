"""Metrics: hand-computed golden numbers, sklearn / numpy agreement, accumulation, Delta_m%."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from apt_hf.metrics import (
    CITYSCAPES_BASELINE,
    F1,
    HIGHER_IS_BETTER,
    NORMAL_ANGLE_RESOLUTION,
    NYUV2_BASELINE,
    TASK_METRICS,
    Accuracy,
    DepthAccumulator,
    DepthErrors,
    MultilabelF1,
    NormalAccumulator,
    NormalErrors,
    RegressionErrors,
    SegmentationAccumulator,
    SegmentationMetrics,
    delta_m,
    metric_for_task_type,
)

MEDIAN_TOL = NORMAL_ANGLE_RESOLUTION / 2 + 1e-9  # bin centre, plus float slack


def _batched_equals_one_shot(metric_a, metric_b, preds, refs, splits=(3, 7)) -> None:
    """add_batch over chunks then compute() equals one compute() on everything."""
    for p, r in zip(np.split(preds, splits), np.split(refs, splits), strict=True):
        metric_a.add_batch(predictions=p, references=r)
    batched = metric_a.compute()
    one_shot = metric_b.compute(predictions=preds, references=refs)
    assert batched.keys() == one_shot.keys()
    for key in batched:
        np.testing.assert_allclose(batched[key], one_shot[key], rtol=1e-12)


# ---------------------------------------------------------------- classification


def test_accuracy_skips_ignore_index() -> None:
    result = Accuracy().compute(predictions=[1, 0, 2, 2, 5], references=[1, 1, 2, -100, -100])
    assert result == {"accuracy": pytest.approx(2 / 3)}
    assert Accuracy(ignore_index=2).compute(predictions=[1, 0, 2], references=[1, 1, 2]) == {
        "accuracy": 0.5
    }


def test_accuracy_token_classification_rows() -> None:
    preds = np.array([[1, 2, 3, 0], [4, 4, 0, 0]])
    refs = np.array([[1, 2, 0, -100], [4, 3, -100, -100]])  # 5 counted tokens, 3 right
    assert Accuracy().compute(predictions=preds, references=refs) == {"accuracy": 0.6}


def test_accuracy_add_batch_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    preds, refs = rng.integers(0, 4, 20), rng.integers(0, 4, 20)
    refs[::5] = -100
    _batched_equals_one_shot(Accuracy(), Accuracy(), preds, refs)


def test_accuracy_nothing_to_score() -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        Accuracy().compute(predictions=[1, 2], references=[-100, -100])


@pytest.mark.parametrize("average", ["binary", "macro", "micro"])
def test_f1_matches_sklearn(average: str) -> None:
    rng = np.random.default_rng(1)
    n_classes = 2 if average == "binary" else 5
    preds, refs = rng.integers(0, n_classes, 200), rng.integers(0, n_classes, 200)
    expected = f1_score(refs, preds, average=average)
    assert F1(average=average).compute(predictions=preds, references=refs)["f1"] == (
        pytest.approx(expected)
    )
    # compute-time override of the constructor's choice
    assert F1().compute(predictions=preds, references=refs, average=average)["f1"] == (
        pytest.approx(expected)
    )


def test_f1_pos_label_ignore_index_and_accumulation() -> None:
    rng = np.random.default_rng(2)
    preds, refs = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
    refs[:4] = -100
    expected = f1_score(refs[4:], preds[4:], pos_label=0)
    got = F1(pos_label=0).compute(predictions=preds, references=refs)["f1"]
    assert got == pytest.approx(expected)
    _batched_equals_one_shot(F1(average="macro"), F1(average="macro"), preds, refs)


def test_f1_rejects_bad_average() -> None:
    with pytest.raises(ValueError, match="average='weighted'"):
        F1(average="weighted")
    with pytest.raises(ValueError, match="at most two classes"):
        F1().compute(predictions=[0, 1, 2], references=[0, 1, 2])


def test_multilabel_f1_matches_sklearn_with_zero_support_label() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((50, 6))
    labels = (rng.random((50, 6)) < 0.4).astype(np.int64)
    labels[:, 4] = 0  # zero support, but some predicted positives: F1 0 by the formula
    labels[:, 5] = 0  # zero support and nothing predicted: 0/0 := 0
    probs[:, 5] = 0.1
    expected = f1_score(labels, probs >= 0.5, average=None, zero_division=0)
    result = MultilabelF1().compute(predictions=probs, references=labels)
    np.testing.assert_allclose(result["f1_per_label"], expected)
    assert result["f1_per_label"][4:] == [0.0, 0.0]
    assert result["f1"] == pytest.approx(expected.mean())
    logits = np.log(probs / (1 - probs))
    from_logits = MultilabelF1(threshold=0.0).compute(predictions=logits, references=labels)
    np.testing.assert_allclose(from_logits["f1_per_label"], expected)
    hard = MultilabelF1().compute(predictions=(probs >= 0.5).astype(int), references=labels)
    np.testing.assert_allclose(hard["f1_per_label"], expected)


def test_multilabel_f1_add_batch_and_validation() -> None:
    rng = np.random.default_rng(4)
    probs, labels = rng.random((10, 3)), rng.integers(0, 2, (10, 3))
    _batched_equals_one_shot(MultilabelF1(), MultilabelF1(), probs, labels)
    with pytest.raises(ValueError, match="0/1"):
        MultilabelF1().compute(predictions=probs, references=labels * 2)


# ---------------------------------------------------------------- regression


def test_regression_errors_match_numpy() -> None:
    rng = np.random.default_rng(5)
    preds, refs = rng.normal(size=40), rng.normal(size=40)
    result = RegressionErrors().compute(predictions=preds, references=refs)
    assert result["mae"] == pytest.approx(np.mean(np.abs(preds - refs)))
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((preds - refs) ** 2)))
    scaled = RegressionErrors(scale=1000.0).compute(predictions=preds, references=refs)
    assert scaled["mae"] == pytest.approx(1000 * result["mae"])


def test_regression_errors_per_target_with_scale() -> None:
    rng = np.random.default_rng(6)
    preds, refs = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    scale = np.array([1.0, 1000.0, 2.0])
    result = RegressionErrors().compute(predictions=preds, references=refs, scale=scale)
    mae = np.mean(np.abs(preds - refs), axis=0) * scale
    rmse = np.sqrt(np.mean((preds - refs) ** 2, axis=0)) * scale
    np.testing.assert_allclose(result["mae_per_target"], mae)
    np.testing.assert_allclose(result["rmse_per_target"], rmse)
    assert result["mae"] == pytest.approx(mae.mean())
    assert result["rmse"] == pytest.approx(rmse.mean())
    _batched_equals_one_shot(RegressionErrors(), RegressionErrors(), preds, refs)
    with pytest.raises(ValueError, match="2 entries for 3 targets"):
        RegressionErrors(scale=[1.0, 2.0]).compute(predictions=preds, references=refs)
    with pytest.raises(ValueError, match="positive"):
        RegressionErrors(scale=0.0).compute(predictions=preds, references=refs)


# ---------------------------------------------------------------- segmentation

# Rows: reference class, columns: predicted class.
#        pred 0  1  2
# ref 0     [3, 1, 0]   row sum 3+1+0 = 4
# ref 1     [0, 2, 1]   row sum 3
# ref 2     [1, 0, 2]   row sum 3          total 10, trace 3+2+2 = 7
# column sums: 4, 3, 3
# IoU_0 = 3 / (4 + 4 - 3) = 3/5 = 0.6
# IoU_1 = 2 / (3 + 3 - 2) = 2/4 = 0.5
# IoU_2 = 2 / (3 + 3 - 2) = 2/4 = 0.5
# mIoU = (0.6 + 0.5 + 0.5) / 3 = 1.6 / 3 = 0.5333...;  pixel acc = 7 / 10 = 0.7
CONFUSION = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 2]])
MIOU, PIXEL_ACC = 1.6 / 3, 0.7


def _pixels(confusion: np.ndarray, n_ignored: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(pred, target) label maps of shape (1, 3, 4) realising ``confusion`` plus ignored pixels."""
    target, pred = [], []
    for (t, p), count in np.ndenumerate(confusion):
        target += [t] * count
        pred += [p] * count
    target += [-1] * n_ignored  # ignore_index: their predictions (here 0) must not count
    pred += [0] * n_ignored
    order = np.random.default_rng(7).permutation(len(target))
    shape = (1, 3, 4)
    return np.array(pred)[order].reshape(shape), np.array(target)[order].reshape(shape)


def test_segmentation_golden_confusion_matrix() -> None:
    pred, target = _pixels(CONFUSION)
    accumulator = SegmentationAccumulator(3)
    accumulator.update(pred, target)
    np.testing.assert_array_equal(accumulator.confusion, CONFUSION)
    result = accumulator.compute()
    assert result["miou"] == pytest.approx(MIOU)
    assert result["pixel_acc"] == pytest.approx(PIXEL_ACC)
    np.testing.assert_allclose(result["iou_per_class"], [0.6, 0.5, 0.5])
    assert SegmentationMetrics(3).compute(predictions=pred, references=target) == result


def test_segmentation_absent_class_left_out_of_miou() -> None:
    pred, target = _pixels(CONFUSION)
    result = SegmentationMetrics(4).compute(predictions=pred, references=target)
    assert result["miou"] == pytest.approx(MIOU)  # class 3 in neither: not averaged
    assert math.isnan(result["iou_per_class"][3])
    pred[0, 0, 0] = 3 if target[0, 0, 0] != 3 else 0  # class 3 predicted, never a reference
    assert SegmentationMetrics(4).compute(predictions=pred, references=target)["iou_per_class"][
        3
    ] == pytest.approx(0.0)


def test_segmentation_scores_and_accumulation() -> None:
    rng = np.random.default_rng(8)
    scores = rng.normal(size=(10, 3, 4, 5))
    target = rng.integers(-1, 3, (10, 4, 5))
    from_labels = SegmentationMetrics(3).compute(predictions=scores.argmax(1), references=target)
    from_scores = SegmentationMetrics(3).compute(
        predictions=torch.from_numpy(scores), references=torch.from_numpy(target)
    )
    assert from_scores == from_labels
    _batched_equals_one_shot(SegmentationMetrics(3), SegmentationMetrics(3), scores, target)


def test_segmentation_validation() -> None:
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="target label 3"):
        metric.compute(predictions=np.zeros((1, 2), int), references=np.array([[0, 3]]))
    with pytest.raises(ValueError, match="class axis"):
        metric.compute(predictions=np.zeros((1, 4, 2)), references=np.zeros((1, 2), int))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="num_process"):
        SegmentationMetrics(3, num_process=2)


# ---------------------------------------------------------------- depth and normals


def test_depth_golden_2x2_with_invalid_pixel() -> None:
    target = np.array([[[[1.0, 2.0], [0.0, 4.0]]]])  # (1, 1, 2, 2); 0 = missing
    pred = np.array([[[[1.5, 1.0], [9.0, 5.0]]]])
    # valid |p - y|: 0.5, 1.0, 1.0 -> abs_err = 2.5 / 3
    # relative: 0.5 / 1, 1.0 / 2, 1.0 / 4 = 0.5 + 0.5 + 0.25 -> rel_err = 1.25 / 3
    result = DepthErrors().compute(predictions=pred, references=target)
    assert result == {"abs_err": pytest.approx(2.5 / 3), "rel_err": pytest.approx(1.25 / 3)}


def test_depth_accumulation_and_validation() -> None:
    rng = np.random.default_rng(9)
    target = rng.random((10, 1, 3, 3)) * (rng.random((10, 1, 3, 3)) > 0.2)
    pred = rng.random((10, 1, 3, 3))
    _batched_equals_one_shot(DepthErrors(), DepthErrors(), pred, target)
    with pytest.raises(ValueError, match="no valid depth"):
        DepthAccumulator().compute()
    with pytest.raises(ValueError, match="shape"):
        DepthErrors().compute(predictions=pred[:, 0], references=target)


def test_normals_golden_angles() -> None:
    up = [0.0, 0.0, 1.0]
    # pixels: 0 deg, 90 deg, 45 deg (unnormalised prediction), invalid target (0, 0, 0)
    pred_last = np.array([[[up, [1.0, 0.0, 0.0]], [[2.0, 0.0, 2.0], up]]])  # (1, 2, 2, 3)
    target_last = np.array([[[up, up], [up, [0.0, 0.0, 0.0]]]])
    expected = {
        "mean_angle": 45.0,
        "median_angle": 45.0,
        "within_11.25": 1 / 3,
        "within_22.5": 1 / 3,
        "within_30": 1 / 3,
    }
    channel_first = NormalErrors().compute(
        predictions=np.moveaxis(pred_last, -1, 1), references=np.moveaxis(target_last, -1, 1)
    )
    channel_last = NormalErrors(channel_axis=-1).compute(
        predictions=pred_last, references=target_last
    )
    for result in (channel_first, channel_last):
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=MEDIAN_TOL), key


def test_normals_match_exact_angles_on_random_data() -> None:
    rng = np.random.default_rng(10)
    pred = rng.normal(size=(6, 3, 5, 7))
    target = rng.normal(size=(6, 3, 5, 7))
    target[:, :, 0, 0] = 0.0  # invalid pixels
    p = np.moveaxis(pred, 1, -1).reshape(-1, 3)
    y = np.moveaxis(target, 1, -1).reshape(-1, 3)
    keep = np.linalg.norm(y, axis=1) > 0
    p, y = p[keep], y[keep]
    cosine = (p * y).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(y, axis=1)
    angles = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    assert len(angles) % 2 == 0  # the median averages two order statistics
    result = NormalErrors().compute(predictions=pred, references=target)
    assert result["mean_angle"] == pytest.approx(angles.mean())
    assert result["median_angle"] == pytest.approx(np.median(angles), abs=MEDIAN_TOL)
    for t in (11.25, 22.5, 30):
        assert result[f"within_{t:g}"] == pytest.approx(np.mean(angles < t))
    _batched_equals_one_shot(NormalErrors(), NormalErrors(), pred, target, splits=(2, 5))


def test_normals_validation() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        NormalAccumulator().update(np.zeros((1, 4, 2, 2)), np.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match="no valid normal"):
        NormalErrors().compute(predictions=np.ones((1, 3, 1, 1)), references=np.zeros((1, 3, 1, 1)))


def test_dense_add_accumulates_single_examples() -> None:
    rng = np.random.default_rng(11)
    target = rng.integers(0, 3, (4, 2, 2))
    pred = rng.integers(0, 3, (4, 2, 2))
    metric = SegmentationMetrics(3)
    for p, t in zip(pred, target, strict=True):
        metric.add(prediction=p, reference=t)
    assert metric.compute() == SegmentationMetrics(3).compute(predictions=pred, references=target)


# ---------------------------------------------------------------- Delta_m


@pytest.mark.parametrize("baseline", [NYUV2_BASELINE, CITYSCAPES_BASELINE])
def test_delta_m_of_the_baseline_is_zero(baseline) -> None:
    assert set(baseline) <= set(HIGHER_IS_BETTER)
    assert delta_m(dict(baseline), baseline) == 0.0


def test_delta_m_hand_computed() -> None:
    # accuracy 0.8 -> 0.9 (higher is better): -(0.9 - 0.8) / 0.8 = -0.125
    # mae      0.5 -> 0.55 (lower is better): +(0.55 - 0.5) / 0.5 = +0.1
    # Delta_m = 100 / 2 * (-0.125 + 0.1) = -1.25
    metrics = {"accuracy": 0.9, "mae": 0.55, "loss": 3.0}  # extra entries are ignored
    assert delta_m(metrics, {"accuracy": 0.8, "mae": 0.5}) == pytest.approx(-1.25)
    flipped = delta_m(metrics, {"accuracy": 0.8, "mae": 0.5}, {"accuracy": False, "mae": False})
    assert flipped == pytest.approx(50 * (0.125 + 0.1))


def test_delta_m_validation() -> None:
    with pytest.raises(ValueError, match="'mae' is missing"):
        delta_m({"accuracy": 0.9}, {"accuracy": 0.8, "mae": 0.5})
    with pytest.raises(ValueError, match="baseline of metric 'mae'"):
        delta_m({"mae": 0.1}, {"mae": 0.0})
    with pytest.raises(ValueError, match="'score' has no direction"):
        delta_m({"score": 0.1}, {"score": 0.2})
    with pytest.raises(ValueError, match="empty"):
        delta_m({}, {})


# ---------------------------------------------------------------- task types


@pytest.mark.parametrize(
    ("task_type", "cls", "kwargs"),
    [
        ("classification", Accuracy, {}),
        ("multilabel", MultilabelF1, {"threshold": 0.0}),
        ("regression", RegressionErrors, {"scale": 1000.0}),
        ("token_classification", Accuracy, {}),
        ("segmentation", SegmentationMetrics, {"num_classes": 13}),
        ("depth", DepthErrors, {}),
        ("normals", NormalErrors, {}),
    ],
)
def test_metric_for_task_type(task_type: str, cls: type, kwargs: dict) -> None:
    assert isinstance(metric_for_task_type(task_type, **kwargs), cls)


def test_metric_for_task_type_errors() -> None:
    assert set(TASK_METRICS) == {
        "classification", "multilabel", "regression", "token_classification", "segmentation",
        "depth", "normals",
    }  # fmt: skip
    with pytest.raises(ValueError, match="known task types: .*'classification'.*'segmentation'"):
        metric_for_task_type("ranking")
    with pytest.raises(TypeError, match="unexpected arguments \\['thresold'\\]"):
        metric_for_task_type("multilabel", thresold=0.3)

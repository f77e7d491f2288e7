"""Task heads and task losses.

Three head families: :class:`SequenceHead` (classification / multilabel / regression) on the
backbone's pooled vector, :class:`TokenClassificationHead` on its token sequence, and
:class:`DenseHead` (segmentation / depth / normals), a light decoder over its multi-scale
feature maps. :func:`task_loss` computes every task's loss and validates the labels first, so
a wrong batch fails with a ValueError naming the task instead of deep inside torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .configuration import CLASS_INDEX_TASKS, SEQUENCE_TASKS, TaskSpec

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class _MLPHead(nn.Module):
    """Dropout + linear, or dropout + linear + GELU + dropout + linear, over the last dim."""

    input_ndim: int = 2
    input_name: str = "(batch, hidden)"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_size: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_size is None:
            self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features))
        else:
            self.mlp = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(in_features, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, out_features),
            )
        self.in_features = in_features

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != self.input_ndim or features.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected features {self.input_name} with hidden = "
                f"{self.in_features}, got shape {tuple(features.shape)}"
            )
        return self.mlp(features)


class SequenceHead(_MLPHead):
    """Pooled vector (B, D) -> (B, num_labels): classification, multilabel and regression."""


class TokenClassificationHead(_MLPHead):
    """Token sequence (B, S, D) -> per-token class logits (B, S, num_labels)."""

    input_ndim = 3
    input_name = "(batch, sequence, hidden)"


class DenseHead(nn.Module):
    """Light decoder from multi-scale feature maps to a per-pixel prediction.

    Each map (B, C_i, H_i, W_i) is projected by a 1x1 conv to ``channels``, upsampled to the
    largest map and summed; then 3x3 conv + ReLU, 1x1 conv to ``out_channels`` and bilinear
    upsampling to the requested (H, W). ``normalize``: L2-normalise the output over channels
    (surface normals).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        out_channels: int,
        *,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in self.in_channels)
        self.fuse = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.classifier = nn.Conv2d(channels, out_channels, kernel_size=1)
        self.normalize = normalize

    def forward(self, maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        if len(maps) != len(self.in_channels) or any(
            m.ndim != 4 or m.shape[1] != c for m, c in zip(maps, self.in_channels, strict=True)
        ):
            raise ValueError(
                f"DenseHead: expected {len(self.in_channels)} feature maps (B, C, H, W) with "
                f"C = {self.in_channels}, got shapes {[tuple(m.shape) for m in maps]}"
            )
        target = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        fused = None
        for proj, feature_map in zip(self.proj, maps, strict=True):
            x = proj(feature_map)
            if x.shape[-2:] != target:
                x = F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        out = self.classifier(F.relu(self.fuse(fused)))
        out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return F.normalize(out, dim=1) if self.normalize else out


def build_head(
    spec: TaskSpec,
    *,
    pooled_size: int | None,
    token_size: int | None,
    feature_channels: Sequence[int] | None,
    hidden_size: int | None,
    dropout: float,
    decoder_channels: int,
) -> nn.Module:
    """The head of ``spec.type``. A size is None when the backbone gives no such output (no
    known pooled width, no token sequence, no feature maps): the task types needing it raise."""
    if spec.type in SEQUENCE_TASKS:
        if pooled_size is None:
            raise ValueError(
                f"task {spec.name!r}: {spec.type} needs the backbone's pooled width, which its "
                "config does not give (no hidden_size / hidden_sizes)"
            )
        return SequenceHead(pooled_size, spec.num_labels, hidden_size, dropout)
    if spec.type == "token_classification":
        if token_size is None:
            raise ValueError(
                f"task {spec.name!r}: token_classification needs a backbone that outputs a token "
                "sequence (e.g. BERT), this backbone does not"
            )
        return TokenClassificationHead(token_size, spec.num_labels, hidden_size, dropout)
    if feature_channels is None:
        raise ValueError(
            f"task {spec.name!r}: {spec.type} needs an image backbone with feature maps or patch "
            "tokens (ResNet, ConvNeXt, Swin, ViT, ...), this backbone has none"
        )
    return DenseHead(
        feature_channels, decoder_channels, spec.num_labels, normalize=spec.type == "normals"
    )


def _label_error(spec: TaskSpec, what: str, expected: str, got: object) -> ValueError:
    return ValueError(
        f"task {spec.name!r} ({spec.type}): labels {what} must be {expected}, got {got}"
    )


def _check_shape(spec: TaskSpec, labels: Tensor, allowed: list[tuple[int, ...]], doc: str) -> None:
    if tuple(labels.shape) not in allowed:
        expected = " or ".join(str(s) for s in allowed) + f" {doc}"
        raise _label_error(spec, "shape", expected, tuple(labels.shape))


def _check_dtype(spec: TaskSpec, labels: Tensor, kinds: tuple[str, ...]) -> None:
    ok = (
        ("int" in kinds and labels.dtype in _INT_DTYPES)
        or ("float" in kinds and labels.dtype.is_floating_point)
        or ("bool" in kinds and labels.dtype == torch.bool)
    )
    if not ok:
        raise _label_error(spec, "dtype", " or ".join(kinds), labels.dtype)


def check_labels(spec: TaskSpec, logits: Tensor, labels: Tensor) -> Tensor:
    """Validate ``labels`` against ``spec`` and the head's ``logits``; return them in the form
    the loss uses (long class indices, float targets, depth as (B, 1, H, W))."""
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"task {spec.name!r} ({spec.type}): labels must be a torch.Tensor, "
            f"got {type(labels).__name__}"
        )
    b, n = logits.shape[0], spec.num_labels
    ignore = spec.ignore_index
    if spec.type == "classification":
        _check_shape(spec, labels, [(b,)], "(batch,)")
    elif spec.type == "multilabel":
        _check_shape(spec, labels, [(b, n)], "(batch, num_labels)")
    elif spec.type == "regression":
        _check_shape(spec, labels, [(b,), (b, 1)] if n == 1 else [(b, n)], "(batch[, num_labels])")
    elif spec.type == "token_classification":
        _check_shape(spec, labels, [(b, logits.shape[1])], "(batch, sequence)")
    elif spec.type == "segmentation":
        _check_shape(spec, labels, [(b, *logits.shape[-2:])], "(batch, height, width)")
    elif spec.type == "depth":
        hw = tuple(logits.shape[-2:])
        _check_shape(spec, labels, [(b, *hw), (b, 1, *hw)], "(batch[, 1], height, width)")
    else:  # normals
        _check_shape(spec, labels, [(b, 3, *logits.shape[-2:])], "(batch, 3, height, width)")

    if spec.type in CLASS_INDEX_TASKS:
        _check_dtype(spec, labels, ("int",))
        labels = labels.long()
        bad = (labels != ignore) & ((labels < 0) | (labels >= n))
        if bool(bad.any()):
            raise _label_error(
                spec,
                "values",
                f"class indices in [0, {n - 1}] or ignore_index={ignore}",
                labels[bad].unique()[:5].tolist(),
            )
        return labels
    if spec.type == "multilabel":
        _check_dtype(spec, labels, ("float", "int", "bool"))
        labels = labels.float()
        bad = (labels != ignore) & ((labels < 0) | (labels > 1))
        if bool(bad.any()):
            raise _label_error(
                spec,
                "values",
                f"in [0, 1] or ignore_index={ignore}",
                labels[bad].unique()[:5].tolist(),
            )
        return labels
    _check_dtype(spec, labels, ("float",))
    if not bool(torch.isfinite(labels).all()):
        raise _label_error(spec, "values", "finite", "NaN or inf")
    if spec.type == "depth" and labels.ndim == 3:
        labels = labels.unsqueeze(1)
    if spec.type == "regression":
        labels = labels.reshape(b, n)
    return labels.float()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (keeping the graph) when nothing is valid."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


_POINTWISE = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


def task_loss(spec: TaskSpec, logits: Tensor, labels: Tensor) -> Tensor:
    """Loss of one task (a scalar, float32), after :func:`check_labels`.

    Class-index tasks: cross-entropy averaged over entries != ``ignore_index``. Multilabel:
    BCE-with-logits over entries != ``ignore_index``. Regression: MSE / L1 / smooth-L1. Depth:
    the pointwise loss on valid pixels (label != 0). Normals: 1 - cos(pred, label) (or L1) on
    valid pixels (label norm > 0). A batch with no valid entry gives 0, not NaN.
    """
    labels = check_labels(spec, logits, labels)
    logits = logits.float()
    if spec.type in CLASS_INDEX_TASKS:
        if spec.type == "token_classification":
            logits = logits.transpose(1, 2)  # (B, C, S), the layout cross_entropy expects
        total = F.cross_entropy(logits, labels, ignore_index=spec.ignore_index, reduction="sum")
        return total / (labels != spec.ignore_index).sum().clamp(min=1)
    if spec.type == "multilabel":
        values = F.binary_cross_entropy_with_logits(logits, labels.clamp(0, 1), reduction="none")
        return _masked_mean(values, labels != spec.ignore_index)
    if spec.type == "regression":
        return _POINTWISE[spec.loss](logits, labels)
    if spec.type == "depth":
        values = _POINTWISE[spec.loss](logits, labels, reduction="none")
        return _masked_mean(values, labels != 0)
    valid = labels.norm(dim=1) > 0  # normals: pixels with a ground-truth vector
    if spec.loss == "cosine":
        values = 1.0 - F.cosine_similarity(logits, labels, dim=1)
        return _masked_mean(values, valid)
    return _masked_mean(F.l1_loss(logits, labels, reduction="none").mean(dim=1), valid)

"""Cityscapes: 7-class segmentation and depth (disparity) from one shared backbone.

    accelerate launch recipes/cityscapes.py --config recipes/configs/cityscapes.yaml [overrides]

e.g. ``--mtl_method nash_mtl --data_root data/cityscapes``. Data: MTAN's preprocessed 128x256
``.npy`` files (``root/{train,val}/{image,label_7,label_19,depth}/{i}.npy``). Evaluation on the
val split (500 images) prints mIoU / pixel accuracy, depth abs / rel error and Delta_m% against
the published single-task baselines (``apt_hf.metrics.CITYSCAPES_BASELINE``, 7 classes;
``--task_baselines '{...}'`` replaces them, ``'{}'`` turns Delta_m off), and writes
``results.json`` to ``--output_dir``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from apt_hf.data.dense import (
    CITYSCAPES_LABELS,
    DEPTH_SCALING,
    DenseAugment,
    DenseModelArguments,
    MTANDense,
    cityscapes_layout,
    dense_model,
    dense_task_specs,
    task_baselines,
)
from apt_hf.metrics import CITYSCAPES_BASELINE
from apt_hf.recipes import parse_recipe_args, run_recipe

TASKS = ("segmentation", "depth")


@dataclass
class DataArguments:
    data_root: str = field(
        default="data/cityscapes",
        metadata={"help": "Root of MTAN's files: {train,val}/{image,label_7,depth}/{i}.npy."},
    )
    labels: str = field(
        default="label_7",
        metadata={
            "help": "Segmentation labels: label_7 (the benchmark) or label_19.",
            "choices": list(CITYSCAPES_LABELS),
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training images."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation images."}
    )
    augment: bool = field(
        default=True,
        metadata={"help": "The protocol's augmentation: random zoom by 1 / 1.2 / 1.5 and flip."},
    )
    depth_scaling: str = field(
        default="inverse",
        metadata={
            "help": "How a zoom by s rescales the disparity: inverse (/ s, the published "
            "protocol), proportional (* s, geometrically consistent for disparity), none.",
            "choices": list(DEPTH_SCALING),
        },
    )
    normalize: bool = field(
        default=True,
        metadata={"help": "ImageNet mean/std normalisation (what pretrained backbones expect)."},
    )


def build_datasets(data: DataArguments) -> tuple[MTANDense, MTANDense]:
    """(train, val) datasets; the training split is augmented if ``data.augment``."""
    layout = cityscapes_layout(data.labels)
    augment = DenseAugment(depth_scaling=data.depth_scaling) if data.augment else None
    train = MTANDense(
        data.data_root,
        "train",
        layout=layout,
        augment=augment,
        normalize=data.normalize,
        max_samples=data.max_train_samples,
    )
    val = MTANDense(
        data.data_root,
        "val",
        layout=layout,
        normalize=data.normalize,
        max_samples=data.max_eval_samples,
    )
    return train, val


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse the config and CLI, train, evaluate; return the evaluation metrics."""
    args, data_args, model_args = parse_recipe_args((DataArguments, DenseModelArguments), argv)
    specs = dense_task_specs(
        model_args.tasks or list(TASKS), CITYSCAPES_LABELS[data_args.labels], TASKS
    )
    train, val = build_datasets(data_args)
    if args.task_baselines is None:
        if data_args.labels == "label_7":
            args.task_baselines = task_baselines(specs, CITYSCAPES_BASELINE)
        else:
            warnings.warn(
                f"labels={data_args.labels}: the published baselines are for label_7; no "
                "Delta_m% unless --task_baselines is given",
                stacklevel=2,
            )
    model = dense_model(model_args, specs, args.seed)
    return run_recipe("cityscapes", model, args, train, val)


if __name__ == "__main__":
    main()

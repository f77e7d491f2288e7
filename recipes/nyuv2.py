"""NYUv2: 13-class segmentation, depth and surface normals from one shared backbone.

    accelerate launch recipes/nyuv2.py --config recipes/configs/nyuv2.yaml [overrides]

e.g. ``--mtl_method pcgrad --apt_optimizer muon --data_root data/nyuv2``. Data: MTAN's
preprocessed ``.npy`` files (``--source mtan --data_root DIR``, the default) or the hub copy
(``--source hub --hub_id tanganke/nyuv2``, a hub id or a local folder in its layout).
Evaluation on the val split (654 images) prints mIoU / pixel accuracy, depth abs / rel error,
normal angle statistics and Delta_m% against the published single-task baselines
(``apt_hf.metrics.NYUV2_BASELINE``; ``--task_baselines '{...}'`` replaces them, ``'{}'`` turns
Delta_m off), and writes ``results.json`` to ``--output_dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from apt_hf.data.dense import (
    NYUV2_HUB_ID,
    NYUV2_NUM_CLASSES,
    DenseAugment,
    DenseModelArguments,
    HubNYUv2,
    MTANDense,
    dense_model,
    dense_task_specs,
    task_baselines,
)
from apt_hf.metrics import NYUV2_BASELINE
from apt_hf.recipes import parse_recipe_args, run_recipe

TASKS = ("segmentation", "depth", "normals")


@dataclass
class DataArguments:
    source: str = field(
        default="mtan",
        metadata={
            "help": "mtan: MTAN's preprocessed .npy files under data_root; hub: the parquet "
            "copy (hub_id).",
            "choices": ["mtan", "hub"],
        },
    )
    data_root: str = field(
        default="data/nyuv2",
        metadata={"help": "Root of MTAN's files: {train,val}/{image,label,depth,normal}/{i}.npy."},
    )
    hub_id: str = field(
        default=NYUV2_HUB_ID,
        metadata={"help": "Hub dataset id, or a local folder in its layout (source hub)."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "datasets cache directory (source hub)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training images."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation images."}
    )
    augment: bool = field(
        default=True,
        metadata={
            "help": "The protocol's augmentation: random zoom by 1 / 1.2 / 1.5 (depth / scale) "
            "and horizontal flip (normal x negated)."
        },
    )
    normalize: bool = field(
        default=True,
        metadata={"help": "ImageNet mean/std normalisation (what pretrained backbones expect)."},
    )


def build_datasets(data: DataArguments) -> tuple[Dataset, Dataset]:
    """(train, val) datasets; the training split is augmented if ``data.augment``."""

    def load(split: str, augment: DenseAugment | None, max_samples: int | None) -> Dataset:
        if data.source == "hub":
            return HubNYUv2(
                data.hub_id,
                split,
                augment=augment,
                normalize=data.normalize,
                max_samples=max_samples,
                cache_dir=data.cache_dir,
            )
        return MTANDense(
            data.data_root,
            split,
            augment=augment,
            normalize=data.normalize,
            max_samples=max_samples,
        )

    augment = DenseAugment(depth_scaling="inverse") if data.augment else None
    return load("train", augment, data.max_train_samples), load("val", None, data.max_eval_samples)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse the config and CLI, train, evaluate; return the evaluation metrics."""
    args, data_args, model_args = parse_recipe_args((DataArguments, DenseModelArguments), argv)
    specs = dense_task_specs(model_args.tasks or list(TASKS), NYUV2_NUM_CLASSES, TASKS)
    train, val = build_datasets(data_args)
    if args.task_baselines is None:
        args.task_baselines = task_baselines(specs, NYUV2_BASELINE)
    model = dense_model(model_args, specs, args.seed)
    return run_recipe("nyuv2", model, args, train, val)


if __name__ == "__main__":
    main()

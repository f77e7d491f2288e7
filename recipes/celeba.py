"""CelebA: 40 binary face attributes as 40 tasks on one shared vision backbone.

    accelerate launch recipes/celeba.py --config recipes/configs/celeba.yaml [overrides]

e.g. ``--mtl_method famo --apt_optimizer adamw --apt false --backbone DIR --dataset DIR``.
Data: the hub's ``flwrlabs/celeba`` (config ``img_align+identity+attr``) or a local copy of it
(``hf download flwrlabs/celeba --repo-type dataset --local-dir DIR``); layout and task layout in
``apt_hf/data/celeba.py``. Protocol (FAMO): 64x64 images, one BCE head per attribute, per-
attribute F1 at 0.5 (``<task>/f1``), their mean ``f1_mean`` selects the epoch, Delta_m% against
``--task_baselines`` when given. Evaluates on ``--eval_split`` (valid; test for the final
number), writes ``results.json`` to ``--output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apt_hf import MultiTaskModel
from apt_hf.data.celeba import (
    CELEBA_CONFIG,
    CELEBA_HUB_ID,
    celeba_compute_metrics,
    celeba_task_specs,
    load_celeba,
)
from apt_hf.recipes import parse_recipe_args, run_recipe


@dataclass
class DataArguments:
    """Where CelebA comes from and how it is prepared."""

    dataset: str = field(
        default=CELEBA_HUB_ID,
        metadata={"help": "Hub dataset id or local directory in the hub's layout."},
    )
    dataset_config: str = field(default=CELEBA_CONFIG, metadata={"help": "Dataset config name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(
        default="valid", metadata={"help": "Split to evaluate on (valid or test)."}
    )
    image_size: int = field(default=64, metadata={"help": "Images are resized to this square."})
    attributes: list[str] | None = field(
        default=None,
        metadata={"help": "Attributes to learn (hub column names; default: all 40)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training images."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N evaluation images."}
    )


@dataclass
class ModelArguments:
    """The shared backbone and the heads."""

    backbone: str = field(
        default="microsoft/resnet-18",
        metadata={"help": "Hub id or local directory of a vision backbone (AutoModel)."},
    )
    head_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden width of MLP heads (default: linear heads)."}
    )
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout before the heads."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse arguments, build the data and the model, train, evaluate; the eval metrics."""
    args, data_args, model_args = parse_recipe_args((DataArguments, ModelArguments), argv)
    kwargs = {
        "config": data_args.dataset_config,
        "attributes": data_args.attributes,
        "image_size": data_args.image_size,
    }
    train = load_celeba(
        data_args.dataset,
        data_args.train_split,
        max_samples=data_args.max_train_samples,
        **kwargs,
    )
    evaluation = load_celeba(
        data_args.dataset, data_args.eval_split, max_samples=data_args.max_eval_samples, **kwargs
    )
    specs = celeba_task_specs(data_args.attributes)
    model = MultiTaskModel.from_backbone(
        model_args.backbone,
        tasks=specs,
        head_hidden_size=model_args.head_hidden_size,
        head_dropout=model_args.head_dropout,
    )
    return run_recipe(
        "celeba",
        model,
        args,
        train,
        evaluation,
        compute_metrics=celeba_compute_metrics(specs, args.task_baselines),
    )


if __name__ == "__main__":
    main()

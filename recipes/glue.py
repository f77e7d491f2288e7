"""GLUE: several GLUE tasks sharing one text encoder, one sub-batch per task at every step.

    accelerate launch recipes/glue.py --config recipes/configs/glue.yaml [overrides]

e.g. ``--tasks sst2 mrpc stsb rte cola --mtl_method pcgrad --backbone DIR --dataset DIR``.
Data: the hub's ``nyu-mll/glue`` (one config per task) or a local copy of it
(``hf download nyu-mll/glue --repo-type dataset --local-dir DIR``); layout, batching and metrics
in ``apt_hf/data/glue.py``. ``per_device_train_batch_size`` counts multi-task examples: each
holds one example of every task, so a step sees T x B sequences. Test labels (-1) are dropped,
never trained on; evaluation is on validation (mnli: validation_matched) with each task's GLUE
metrics, their average ``glue_score`` and Delta_m% against ``--task_baselines`` when given.
Writes the model, the tokenizer and ``results.json`` to ``--output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer

from apt_hf.data.glue import (
    GLUE_HUB_ID,
    GlueMultiTaskModel,
    TaskZipCollator,
    glue_compute_metrics,
    glue_datasets,
)
from apt_hf.recipes import parse_recipe_args, run_recipe


@dataclass
class DataArguments:
    """Which GLUE tasks and how they are tokenized."""

    dataset: str = field(
        default=GLUE_HUB_ID,
        metadata={"help": "Hub dataset id or local directory in the hub's layout."},
    )
    tasks: list[str] = field(
        default_factory=lambda: ["sst2", "mrpc", "stsb", "rte", "cola"],
        metadata={"help": "GLUE tasks (config names) sharing the encoder."},
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Sequences (pairs together) are truncated to this."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N labelled training rows per task."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N labelled evaluation rows per task."}
    )


@dataclass
class ModelArguments:
    """The shared text encoder and the heads."""

    backbone: str = field(
        default="bert-base-uncased",
        metadata={"help": "Hub id or local directory of a text encoder and its tokenizer."},
    )
    head_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden width of MLP heads (default: linear heads)."}
    )
    head_dropout: float = field(default=0.1, metadata={"help": "Dropout before the heads."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse arguments, build the data and the model, train, evaluate; the eval metrics."""
    args, data_args, model_args = parse_recipe_args((DataArguments, ModelArguments), argv)
    tokenizer = AutoTokenizer.from_pretrained(model_args.backbone)
    specs, train, evaluation = glue_datasets(
        data_args.dataset,
        data_args.tasks,
        tokenizer,
        max_seq_length=data_args.max_seq_length,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
    )
    model = GlueMultiTaskModel.from_backbone(
        model_args.backbone,
        tasks=specs,
        head_hidden_size=model_args.head_hidden_size,
        head_dropout=model_args.head_dropout,
    )
    metrics = run_recipe(
        "glue",
        model,
        args,
        train,
        evaluation,
        data_collator=TaskZipCollator(tokenizer, specs),
        compute_metrics=glue_compute_metrics(specs, args.task_baselines),
    )
    if args.should_save:
        tokenizer.save_pretrained(args.output_dir)
    return metrics


if __name__ == "__main__":
    main()

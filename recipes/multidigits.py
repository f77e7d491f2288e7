"""MultiDigits: the offline default recipe (runs anywhere, no download).

MultiMNIST's layout on scikit-learn's bundled 8x8 digits (apt_hf.data.multidigits): a left digit
and a partner shifted down-right on a 10x10 canvas, two 10-class tasks. A small ResNet built from
a config (no pretrained weights needed) with one linear head per digit. On 2 CPU cores the
default config trains in about two minutes and prints per-task accuracy and Delta_m% against the
single-task baselines in the config (measured with this recipe, see recipes/configs).

    python recipes/multidigits.py --config recipes/configs/multidigits.yaml
    accelerate launch recipes/multidigits.py --config recipes/configs/multidigits.yaml \\
        --mtl_method pcgrad --apt_optimizer muon
    apt-hf train multidigits --mtl_method nash_mtl

Single-task baselines: ``--tasks left`` (or ``right``) trains one head only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import ResNetConfig

from apt_hf import MultiTaskConfig, MultiTaskModel, TaskSpec
from apt_hf.data import make_multidigits
from apt_hf.recipes import parse_recipe_args, run_recipe

TASKS = ("left", "right")


@dataclass
class DataArguments:
    image_size: int = field(default=32, metadata={"help": "Canvas upsampled to this size."})
    n_train_pairs: int | None = field(
        default=None, metadata={"help": "Training pairs (default: 4x the training digits)."}
    )
    n_eval_pairs: int | None = field(default=None, metadata={"help": "Evaluation pairs."})
    data_seed_pairs: int = field(default=0, metadata={"help": "Seed of the digit split/pairs."})


@dataclass
class ModelArguments:
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local directory of a vision backbone; default: a small "
            "ResNet built from a config."
        },
    )
    width: int = field(default=16, metadata={"help": "Channels of the small ResNet's stem."})
    tasks: str = field(
        default="left,right", metadata={"help": "Comma-separated tasks (one for a baseline)."}
    )


class PairImages(Dataset):
    """MultiDigits pairs as ``pixel_values`` (3 channels, upsampled) and one label per task."""

    def __init__(
        self, split: str, n_pairs: int | None, image_size: int, seed: int, tasks: tuple[str, ...]
    ) -> None:
        data = make_multidigits(split, n_pairs, seed=seed)
        images = F.interpolate(
            data["image"], size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        self.pixels = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.labels = {task: data[task] for task in tasks}

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.pixels[i]}
        item.update({f"labels_{task}": labels[i] for task, labels in self.labels.items()})
        return item


def build_model(model_args: ModelArguments, tasks: tuple[str, ...]) -> MultiTaskModel:
    specs = [TaskSpec(name=task, type="classification", num_labels=10) for task in tasks]
    if model_args.backbone is not None:
        return MultiTaskModel.from_backbone(model_args.backbone, tasks=specs)
    w = model_args.width
    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=w,
        hidden_sizes=[w, 2 * w, 4 * w],
        depths=[1, 1, 1],
        layer_type="basic",
    )
    return MultiTaskModel(
        MultiTaskConfig(backbone_config=backbone, tasks=[s.to_dict() for s in specs])
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, data_args, model_args = parse_recipe_args((DataArguments, ModelArguments), argv)
    tasks = tuple(t.strip() for t in model_args.tasks.split(",") if t.strip())
    unknown = sorted(set(tasks) - set(TASKS))
    if not tasks or unknown:
        raise ValueError(f"tasks={model_args.tasks!r}: choose from {list(TASKS)}")
    if args.task_baselines:  # a single-task run reports only its own metrics
        args.task_baselines = {
            k: v for k, v in args.task_baselines.items() if k.split("/")[0] in tasks
        } or None
    torch.manual_seed(args.seed)
    train = PairImages(
        "train", data_args.n_train_pairs, data_args.image_size, data_args.data_seed_pairs, tasks
    )
    evaluation = PairImages(
        "test", data_args.n_eval_pairs, data_args.image_size, data_args.data_seed_pairs, tasks
    )
    return run_recipe("multidigits", build_model(model_args, tasks), args, train, evaluation)


if __name__ == "__main__":
    main()

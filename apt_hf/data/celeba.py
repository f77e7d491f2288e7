"""CelebA's 40 binary face attributes as 40 tasks, from the hub's ``flwrlabs/celeba``.

Layout (the hub repository or a local copy of it, e.g. ``hf download flwrlabs/celeba
--repo-type dataset --local-dir DIR``): ``README.md`` whose YAML ``configs:`` block declares
the config ``img_align+identity+attr`` with the splits train / valid / test, and
``img_align+identity+attr/{split}-NNNNN-of-NNNNN.parquet`` with the columns ``image`` (Image),
``celeb_id`` (int) and the 40 bool attribute columns of ``list_attr_celeba.txt``.

Task layout: one task per attribute, because the MTL methods need one loss per attribute. Each
is a ``multilabel`` TaskSpec with ``num_labels=1``: one logit and binary cross-entropy, FAMO's
40 linear heads with BCE exactly (a 2-class ``classification`` head would be a softmax over two
logits: the same model with twice the head weights), and
:func:`apt_hf.metrics.multitask_compute_metrics` reports its F1 at sigmoid >= 0.5 as
``<task>/f1``, the protocol's metric.

Task names are the attribute names where those are valid task names (Python identifiers, not
keywords, not nn.ModuleDict attributes) and ``a_<attribute>`` otherwise: only
``5_o_Clock_Shadow`` -> ``a_5_o_Clock_Shadow`` among CelebA's 40.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..metrics import multitask_compute_metrics
from ..modeling import TaskSpec
from .hub import load_hub_split

CELEBA_HUB_ID = "flwrlabs/celeba"
CELEBA_CONFIG = "img_align+identity+attr"
CELEBA_SPLITS: tuple[str, ...] = ("train", "valid", "test")
# The 40 attributes in list_attr_celeba.txt's order (the hub's column names).
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
# ImageNet statistics: the default backbone (microsoft/resnet-18) was pretrained with them.
IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

CELEBA_LAYOUT = (
    f"DIR/README.md with a YAML 'configs:' block declaring config_name {CELEBA_CONFIG} and "
    f"data_files for the splits {list(CELEBA_SPLITS)}, and "
    f"DIR/{CELEBA_CONFIG}/<split>-NNNNN-of-NNNNN.parquet with the columns image (Image), "
    "celeb_id and the 40 bool attribute columns of list_attr_celeba.txt (5_o_Clock_Shadow, "
    "Arched_Eyebrows, ..., Young)"
)
_MODULE_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def attribute_task_name(attribute: str) -> str:
    """The task name of a CelebA attribute: the attribute with every character outside
    [A-Za-z0-9_] replaced by '_', prefixed with 'a_' unless that is a valid task name."""
    name = re.sub(r"\W", "_", attribute, flags=re.ASCII)
    if not name.isidentifier() or keyword.iskeyword(name) or name in _MODULE_DICT_ATTRIBUTES:
        name = f"a_{name}"
    return name


def _check_attributes(attributes: Sequence[str] | None) -> list[str]:
    if attributes is None:
        return list(CELEBA_ATTRIBUTES)
    if isinstance(attributes, str) or not attributes:
        raise ValueError(
            f"attributes={attributes!r}: expected a non-empty list of CelebA attribute names"
        )
    unknown = [a for a in attributes if a not in CELEBA_ATTRIBUTES]
    if unknown:
        raise ValueError(
            f"attributes: unknown CelebA attribute(s) {unknown}; known: {list(CELEBA_ATTRIBUTES)}"
        )
    repeated = sorted({a for a in attributes if list(attributes).count(a) > 1})
    if repeated:
        raise ValueError(f"attributes: repeated {repeated}")
    return list(attributes)


def celeba_task_specs(attributes: Sequence[str] | None = None) -> list[TaskSpec]:
    """One ``multilabel`` task with one label per attribute (all 40 when ``attributes`` is
    None), named by :func:`attribute_task_name`, labels in ``labels_<task>``."""
    return [
        TaskSpec(name=attribute_task_name(a), type="multilabel", num_labels=1)
        for a in _check_attributes(attributes)
    ]


def image_to_tensor(image: Image.Image, size: int) -> Tensor:
    """RGB image -> (3, size, size) float, resized bilinearly (with antialiasing, as PIL does)
    and normalised with ``IMAGE_MEAN`` / ``IMAGE_STD``."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class CelebATransform:
    """``with_transform`` function: a batch of ``pixel_values`` (PIL images) and 0/1 label
    columns -> (B, 3, size, size) normalised images and (B, 1) float labels. A module-level
    class, so DataLoader workers can pickle it under any start method."""

    size: int
    label_columns: tuple[str, ...]

    def __call__(self, batch: Mapping[str, list]) -> dict[str, Tensor]:
        images = [image_to_tensor(image, self.size) for image in batch["pixel_values"]]
        out = {"pixel_values": torch.stack(images)}
        for column in self.label_columns:
            out[column] = torch.tensor(batch[column], dtype=torch.float32).unsqueeze(1)
        return out


def load_celeba(
    path: str = CELEBA_HUB_ID,
    split: str = "train",
    *,
    config: str = CELEBA_CONFIG,
    attributes: Sequence[str] | None = None,
    image_size: int = 64,
    max_samples: int | None = None,
) -> Any:
    """One split as a ``datasets.Dataset`` whose rows are ``pixel_values`` (3, image_size,
    image_size), normalised, and one ``labels_<task>`` (1,) float 0/1 per attribute, computed
    on access (``with_transform``), in the task order of :func:`celeba_task_specs`.
    ``max_samples``: keep the split's first ``max_samples`` rows."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}: expected an int >= 1")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r}: expected an int >= 1 or None")
    chosen = _check_attributes(attributes)
    data = load_hub_split(path, config, split, hub_id=CELEBA_HUB_ID, layout=CELEBA_LAYOUT)
    missing = [c for c in ("image", *chosen) if c not in data.column_names]
    if missing:
        raise ValueError(
            f"CelebA {path!r} split {split!r} lacks the column(s) {missing} (has "
            f"{data.column_names}). Expected layout: {CELEBA_LAYOUT}."
        )
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    columns = {a: f"labels_{attribute_task_name(a)}" for a in chosen}
    data = data.select_columns(["image", *chosen]).rename_columns(
        {"image": "pixel_values", **columns}
    )
    return data.with_transform(CelebATransform(image_size, tuple(columns.values())))


def celeba_compute_metrics(
    task_specs: Sequence[TaskSpec], baselines: Mapping[str, float] | None = None
) -> Callable[[Any], dict[str, float]]:
    """``multitask_compute_metrics`` (``<task>/f1`` per attribute, ``delta_m`` with
    ``baselines``) plus ``f1_mean``, the mean F1 over the attributes: the protocol picks the
    epoch with the best validation ``f1_mean`` (``metric_for_best_model: f1_mean``)."""
    per_task = multitask_compute_metrics(task_specs, baselines)
    names = [spec.name for spec in task_specs]

    def compute_metrics(prediction: Any) -> dict[str, float]:
        out = per_task(prediction)
        out["f1_mean"] = float(np.mean([out[f"{name}/f1"] for name in names]))
        return out

    return compute_metrics

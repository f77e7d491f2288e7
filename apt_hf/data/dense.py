"""Dense-prediction data for the NYUv2 and Cityscapes recipes: MTAN's preprocessed ``.npy``
files, the hub copy of NYUv2, the protocol's training augmentation, and the task specs and
single-task baselines the recipes train and score with.

Items are dicts of tensors, channels first (what ``MultiTaskModel`` and its dense heads read):

* ``pixel_values`` (3, H, W) float: in [0, 1], or ImageNet-normalised with ``normalize=True``;
* ``labels_segmentation`` (H, W) long: class indices, ``IGNORE_INDEX`` (-1) where unlabelled;
* ``labels_depth`` (1, H, W) float: metres (NYUv2) or disparity (Cityscapes), 0 where missing;
* ``labels_normals`` (3, H, W) float: unit vectors, (0, 0, 0) where invalid (NYUv2 only).

Sizes are read from the files, never assumed (NYUv2 is 288x384, Cityscapes 128x256).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import set_seed

from ..modeling import MultiTaskModel, TaskSpec

__all__ = [
    "CITYSCAPES_LABELS",
    "DEPTH_SCALING",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NYUV2_HUB_ID",
    "NYUV2_NUM_CLASSES",
    "TASK_METRIC_NAMES",
    "DenseAugment",
    "HubNYUv2",
    "MTANDense",
    "MTANLayout",
    "cityscapes_layout",
    "dense_task_specs",
    "hflip",
    "nyuv2_layout",
    "scale_crop",
    "task_baselines",
]

SPLITS: tuple[str, ...] = ("train", "val")
IGNORE_INDEX = -1
NYUV2_NUM_CLASSES = 13
#: Cityscapes label folders of MTAN's files and their number of classes.
CITYSCAPES_LABELS: Mapping[str, int] = MappingProxyType({"label_7": 7, "label_19": 19})
NYUV2_HUB_ID = "tanganke/nyuv2"
#: How a zoom by s changes depth values: "inverse" (d / s, MTAN's rule for metric depth; the
#: published protocol applies it to Cityscapes' disparity too), "proportional" (d * s: what a
#: zoom does to disparity), "none".
DEPTH_SCALING: tuple[str, ...] = ("inverse", "proportional", "none")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Metrics apt_hf.metrics reports per dense task type (the keys of NYUV2_BASELINE and
#: CITYSCAPES_BASELINE).
TASK_METRIC_NAMES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "segmentation": ("miou", "pixel_acc"),
        "depth": ("abs_err", "rel_err"),
        "normals": ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"),
    }
)
_KEYS = {
    "segmentation": "labels_segmentation",
    "depth": "labels_depth",
    "normals": "labels_normals",
}

Item = dict[str, Tensor]


# --------------------------------------------------------------------------- tasks, baselines
@dataclass
class DenseModelArguments:
    """Model options of the dense recipes (NYUv2, Cityscapes)."""

    backbone: str = field(
        default="microsoft/resnet-50",
        metadata={"help": "Backbone with feature maps: hub id or local directory."},
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tasks to train (default: all of the dataset's; one: a single-task run)."
        },
    )
    decoder_channels: int = field(
        default=128, metadata={"help": "Width of each dense head's decoder."}
    )


def dense_model(
    model_args: DenseModelArguments, specs: Sequence[TaskSpec], seed: int
) -> MultiTaskModel:
    """The dense recipes' model: the pretrained backbone plus one decoder per task, the heads
    initialised under ``seed``."""
    set_seed(seed)
    return MultiTaskModel.from_backbone(
        model_args.backbone, tasks=list(specs), dense_decoder_channels=model_args.decoder_channels
    )


def dense_task_specs(
    tasks: Sequence[str], num_classes: int, allowed: Sequence[str] = tuple(_KEYS)
) -> list[TaskSpec]:
    """Task specs named after their type (so the label columns are ``labels_<type>``):
    segmentation with ``num_classes`` classes and ignore index -1, L1 depth on valid pixels,
    cosine normals on valid pixels. ``tasks``: distinct names from ``allowed``."""
    if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(allowed):
        raise ValueError(
            f"tasks={list(tasks)!r} is invalid: choose one or more distinct tasks from "
            f"{list(allowed)}"
        )
    return [
        TaskSpec(
            name="segmentation",
            type="segmentation",
            num_labels=num_classes,
            ignore_index=IGNORE_INDEX,
        )
        if task == "segmentation"
        else TaskSpec(name=task, type=task)
        for task in tasks
    ]


def task_baselines(specs: Sequence[TaskSpec], published: Mapping[str, float]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for APTConfig.task_baselines: each dense task's metrics
    (TASK_METRIC_NAMES) looked up in a published single-task table such as
    ``apt_hf.metrics.NYUV2_BASELINE``."""
    out = {}
    for spec in specs:
        for metric in TASK_METRIC_NAMES[spec.type]:
            if metric not in published:
                raise ValueError(
                    f"task {spec.name!r}: the baseline table has no {metric!r} "
                    f"(it has {sorted(published)})"
                )
            out[f"{spec.name}/{metric}"] = float(published[metric])
    return out


# --------------------------------------------------------------------------- augmentation
def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize a (C, H, W) tensor; "bilinear" uses pixel centres, as "nearest-exact" does."""
    align = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=size, mode=mode, **align)[0]


def scale_crop(
    item: Item, scale: float, top: int, left: int, *, depth_scaling: str = "inverse"
) -> Item:
    """Zoom by ``scale`` >= 1: crop the (H / scale, W / scale) window at (top, left) and resize
    it back to (H, W). Image bilinear; segmentation labels nearest (ignore pixels stay ignore);
    depth nearest (missing pixels stay 0, valid ones never mix with them), then rescaled by
    ``depth_scaling``; normals bilinear, renormalised, and zero wherever the nearest source
    pixel was invalid."""
    if depth_scaling not in DEPTH_SCALING:
        raise ValueError(f"depth_scaling={depth_scaling!r}; choose one of {list(DEPTH_SCALING)}")
    height, width = item["pixel_values"].shape[-2:]
    h, w = int(height / scale), int(width / scale)
    if not (0 <= top <= height - h and 0 <= left <= width - w):
        raise ValueError(
            f"crop window {h}x{w} at ({top}, {left}) does not fit the {height}x{width} image"
        )
    size = (height, width)
    out = dict(item)

    def crop(x: Tensor) -> Tensor:
        return x[..., top : top + h, left : left + w]

    out["pixel_values"] = _resize(crop(item["pixel_values"]), size, "bilinear")
    if "labels_segmentation" in item:
        labels = crop(item["labels_segmentation"])[None].float()
        out["labels_segmentation"] = _resize(labels, size, "nearest-exact")[0].long()
    if "labels_depth" in item:
        depth = _resize(crop(item["labels_depth"]), size, "nearest-exact")
        factor = {"inverse": 1.0 / scale, "proportional": scale, "none": 1.0}[depth_scaling]
        out["labels_depth"] = depth * factor
    if "labels_normals" in item:
        normals = crop(item["labels_normals"])
        valid = (normals.norm(dim=0, keepdim=True) > 0).float()
        valid = _resize(valid, size, "nearest-exact") > 0
        resized = F.normalize(_resize(normals, size, "bilinear"), dim=0)
        out["labels_normals"] = resized * valid
    return out


def hflip(item: Item) -> Item:
    """Mirror left-right; the normals' x component changes sign."""
    out = {key: value.flip(-1) for key, value in item.items()}
    if "labels_normals" in out:
        normals = out["labels_normals"]
        out["labels_normals"] = torch.cat([-normals[:1], normals[1:]])
    return out


@dataclass
class DenseAugment:
    """The MTL protocol's training augmentation (MTAN issue #34, used by CAGrad, Nash-MTL,
    FAMO): a zoom by a scale drawn uniformly from ``scales`` at a uniform random position
    (:func:`scale_crop`), then a horizontal flip with probability ``flip_prob`` (:func:`hflip`).

    Random numbers come from ``generator`` when given (reproducible, single process), else
    from torch's global RNG (seeded by Trainer and per DataLoader worker).
    """

    scales: tuple[float, ...] = (1.0, 1.2, 1.5)
    flip_prob: float = 0.5
    depth_scaling: str = "inverse"

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(not s >= 1.0 for s in self.scales):
            raise ValueError(f"scales={self.scales!r}: expected one or more values >= 1")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob={self.flip_prob!r} is out of range: allowed [0, 1]")
        if self.depth_scaling not in DEPTH_SCALING:
            raise ValueError(
                f"depth_scaling={self.depth_scaling!r}; choose one of {list(DEPTH_SCALING)}"
            )

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        def draw(high: int) -> int:
            return int(torch.randint(high, (), generator=generator))

        height, width = item["pixel_values"].shape[-2:]
        scale = self.scales[draw(len(self.scales))]
        h, w = int(height / scale), int(width / scale)
        top, left = draw(height - h + 1), draw(width - w + 1)
        flip = float(torch.rand((), generator=generator)) < self.flip_prob
        if (h, w) != (height, width):
            item = scale_crop(item, scale, top, left, depth_scaling=self.depth_scaling)
        return hflip(item) if flip else item


# --------------------------------------------------------------------------- datasets
class _DenseDataset(Dataset):
    """Raw items from ``_load``, then the augmentation (if any), then image normalisation."""

    def __init__(
        self,
        *,
        augment: DenseAugment | None,
        normalize: bool,
        generator: torch.Generator | None,
    ) -> None:
        self.augment = augment
        self.normalize = normalize
        self.generator = generator
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def _load(self, index: int) -> Item:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Item:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        item = self._load(index % len(self))
        if self.augment is not None:
            item = self.augment(item, self.generator)
        if self.normalize:
            item["pixel_values"] = (item["pixel_values"] - self._mean) / self._std
        return item


@dataclass(frozen=True)
class MTANLayout:
    """Where one dataset's arrays live in MTAN's tree: ``root/<split>/<folder>/<i>.npy``."""

    name: str
    folders: Mapping[str, str]  # item key -> folder
    url: str
    shapes: str  # the documented shapes, for error messages

    def missing(self, root: Path, what: Path) -> FileNotFoundError:
        """The error for a missing path: what is missing, where to get the data, the layout."""
        tree = "{" + ",".join(self.folders.values()) + "}"
        return FileNotFoundError(
            f"{self.name} data not found: {what} does not exist.\n"
            f"Download MTAN's preprocessed {self.name} files ({self.url}, linked from "
            "https://github.com/lorenmt/mtan) and unzip them so that --data_root "
            f"({root}) holds:\n"
            f"  {root}/{{train,val}}/{tree}/{{i}}.npy  for i = 0..N-1\n"
            f"  {self.shapes}"
        )


def nyuv2_layout() -> MTANLayout:
    """NYUv2 in MTAN's files (795 train / 654 val)."""
    return MTANLayout(
        name="NYUv2",
        folders={
            "pixel_values": "image",
            "labels_segmentation": "label",
            "labels_depth": "depth",
            "labels_normals": "normal",
        },
        url="https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip?dl=0",
        shapes="image (288,384,3) in [0,1]; label (288,384) 0..12, -1 ignore; depth "
        "(288,384,1) metres, 0 missing; normal (288,384,3), (0,0,0) invalid. Or use the hub "
        f"copy: --source hub --hub_id {NYUV2_HUB_ID}",
    )


def cityscapes_layout(labels: str = "label_7") -> MTANLayout:
    """Cityscapes in MTAN's 128x256 files (2975 train / 500 val); ``labels``: label_7 or
    label_19."""
    if labels not in CITYSCAPES_LABELS:
        raise ValueError(f"labels={labels!r}; choose one of {list(CITYSCAPES_LABELS)}")
    return MTANLayout(
        name="Cityscapes",
        folders={"pixel_values": "image", "labels_segmentation": labels, "labels_depth": "depth"},
        url="https://www.dropbox.com/s/lg2ktu7o8hzwf99/cityscapes2.zip?dl=0",
        shapes="image (128,256,3) in [0,1]; label_7 0..6 / label_19 0..18, -1 ignore; depth "
        "(128,256,1) disparity, 0 invalid",
    )


def _npy_indices(folder: Path) -> set[int]:
    return {int(p.stem) for p in folder.glob("*.npy") if p.stem.isdigit()}


class MTANDense(_DenseDataset):
    """One split of MTAN's preprocessed ``.npy`` tree, channels moved first and cast (image,
    depth, normals float32; labels long). Every file is checked to exist when the dataset is
    built; a missing one raises FileNotFoundError naming it, the download and the layout."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        layout: MTANLayout | None = None,
        augment: DenseAugment | None = None,
        normalize: bool = False,
        max_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(augment=augment, normalize=normalize, generator=generator)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed: choose one of {list(SPLITS)}")
        self.layout = layout or nyuv2_layout()
        self.root = Path(root)
        base = self.root / split
        for path in (self.root, base):
            if not path.is_dir():
                raise self.layout.missing(self.root, path)
        self.paths = {key: base / folder for key, folder in self.layout.folders.items()}
        first = self.paths["pixel_values"]
        if not first.is_dir():
            raise self.layout.missing(self.root, first)
        n = len(_npy_indices(first))
        if n == 0:
            raise self.layout.missing(self.root, first / "0.npy")
        for folder in self.paths.values():
            if not folder.is_dir():
                raise self.layout.missing(self.root, folder)
            absent = sorted(set(range(n)) - _npy_indices(folder))
            if absent:
                raise self.layout.missing(self.root, folder / f"{absent[0]}.npy")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples!r} must be >= 1 or None")
        self.n = n if max_samples is None else min(n, max_samples)

    def __len__(self) -> int:
        return self.n

    def _load(self, index: int) -> Item:
        arrays = {key: np.load(path / f"{index}.npy") for key, path in self.paths.items()}
        image = arrays["pixel_values"]
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"{self.paths['pixel_values'] / f'{index}.npy'}: image shape {image.shape}, "
                "expected (H, W, 3)"
            )
        hw = image.shape[:2]
        expected = {"labels_segmentation": hw, "labels_depth": (*hw, 1), "labels_normals": (*hw, 3)}
        for key, array in arrays.items():
            if key == "labels_depth" and array.shape == hw:
                array = arrays[key] = array[..., None]
            if key != "pixel_values" and array.shape != expected[key]:
                raise ValueError(
                    f"{self.paths[key] / f'{index}.npy'}: shape {array.shape}, expected "
                    f"{expected[key]} (the image is {hw})"
                )
        item = {
            key: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0))).float()
            for key, a in arrays.items()
            if key != "labels_segmentation"
        }
        if "labels_segmentation" in arrays:
            item["labels_segmentation"] = torch.from_numpy(arrays["labels_segmentation"]).long()
        return item


#: Hub column -> item key (the hub's ``noise`` column is not used).
HUB_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        "image": "pixel_values",
        "segmentation": "labels_segmentation",
        "depth": "labels_depth",
        "normal": "labels_normals",
    }
)


class HubNYUv2(_DenseDataset):
    """One split (train / val) of the hub copy of NYUv2 (``tanganke/nyuv2``, parquet, arrays
    already channel-first) through ``datasets.load_dataset(path_or_id, split=split)``;
    ``path_or_id`` may be a local folder in the hub's layout."""

    def __init__(
        self,
        path_or_id: str = NYUV2_HUB_ID,
        split: str = "train",
        *,
        augment: DenseAugment | None = None,
        normalize: bool = False,
        max_samples: int | None = None,
        generator: torch.Generator | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(augment=augment, normalize=normalize, generator=generator)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed: choose one of {list(SPLITS)}")
        try:
            data = datasets.load_dataset(path_or_id, split=split, cache_dir=cache_dir)
        except OSError as err:  # FileNotFoundError, ConnectionError (offline / no such repo)
            raise FileNotFoundError(
                f"NYUv2 hub copy not found: datasets.load_dataset({path_or_id!r}, "
                f"split={split!r}) failed ({err}).\n"
                f"Download it once with network access (the hub dataset {NYUV2_HUB_ID}, ~3 GB "
                "of parquet), or pass --hub_id a local folder in its layout: README.md with a "
                "`configs:` block and data/{train,val}-*.parquet holding image (3,288,384) "
                "float32, segmentation (288,384) int64, depth (1,288,384), normal (3,288,384). "
                "Or use MTAN's .npy files: --source mtan --data_root DIR."
            ) from err
        missing = sorted(set(HUB_COLUMNS) - set(data.column_names))
        if missing:
            raise ValueError(
                f"{path_or_id} ({split}): missing column(s) {missing}; expected "
                f"{sorted(HUB_COLUMNS)}, got {data.column_names}"
            )
        if max_samples is not None:
            if max_samples < 1:
                raise ValueError(f"max_samples={max_samples!r} must be >= 1 or None")
            data = data.select(range(min(len(data), max_samples)))
        self.data = data.select_columns(list(HUB_COLUMNS)).with_format("numpy")

    def __len__(self) -> int:
        return len(self.data)

    def _load(self, index: int) -> Item:
        row = self.data[index]
        item = {
            key: torch.from_numpy(np.asarray(row[column], dtype=np.float32))
            for column, key in HUB_COLUMNS.items()
            if column != "segmentation"
        }
        item["labels_segmentation"] = torch.from_numpy(np.asarray(row["segmentation"])).long()
        return item

"""Dense recipes (NYUv2, Cityscapes): loaders, augmentation, missing-data errors, end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import ResNetConfig, ResNetModel

from apt_hf.data.dense import (
    DenseAugment,
    HubNYUv2,
    MTANDense,
    cityscapes_layout,
    dense_task_specs,
    hflip,
    scale_crop,
    task_baselines,
)
from apt_hf.metrics import CITYSCAPES_BASELINE, NYUV2_BASELINE, delta_m

ROOT = Path(__file__).resolve().parent.parent
H, W = 24, 32  # small, not MTAN's 288x384: the loaders must read sizes from the files


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def _sample(rng: np.random.Generator, num_classes: int, normals: bool) -> dict[str, np.ndarray]:
    """One MTAN-style sample, channel-last, with ignore labels, missing depth, invalid normals."""
    label = rng.integers(0, num_classes, (H, W)).astype(np.float32)  # MTAN stores floats
    label[:4, :6] = -1
    depth = rng.uniform(0.5, 10.0, (H, W, 1)).astype(np.float32)
    depth[-5:, -7:] = 0.0
    out = {"image": rng.random((H, W, 3), dtype=np.float32), "label": label, "depth": depth}
    if normals:
        normal = rng.normal(size=(H, W, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        normal[10:14, 3:9] = 0.0
        out["normal"] = normal
    return out


def make_mtan_tree(root: Path, kind: str = "nyuv2", n: dict | None = None, seed: int = 0) -> dict:
    """root/{train,val}/{folders}/{i}.npy as MTAN ships them; returns the arrays written."""
    rng = np.random.default_rng(seed)
    written: dict = {}
    for split, count in (n or {"train": 4, "val": 2}).items():
        for i in range(count):
            sample = _sample(rng, 13 if kind == "nyuv2" else 7, normals=kind == "nyuv2")
            if kind == "cityscapes":
                sample["label_7"] = sample.pop("label").astype(np.int64)
                sample["label_19"] = rng.integers(-1, 19, (H, W))
            for folder, array in sample.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)
            written[split, i] = sample
    return written


HUB_FEATURES = datasets.Features(
    {
        "image": datasets.Array3D((3, H, W), "float32"),
        "segmentation": datasets.Array2D((H, W), "int64"),
        "depth": datasets.Array3D((1, H, W), "float32"),
        "normal": datasets.Array3D((3, H, W), "float32"),
        "noise": datasets.Array3D((1, H, W), "float32"),
    }
)
HUB_README = f"""---
dataset_info:
  features:
  - name: image
    dtype:
      array3_d:
        shape: [3, {H}, {W}]
        dtype: float32
  - name: segmentation
    dtype:
      array2_d:
        shape: [{H}, {W}]
        dtype: int64
  - name: depth
    dtype:
      array3_d:
        shape: [1, {H}, {W}]
        dtype: float32
  - name: normal
    dtype:
      array3_d:
        shape: [3, {H}, {W}]
        dtype: float32
  - name: noise
    dtype:
      array3_d:
        shape: [1, {H}, {W}]
        dtype: float32
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: val
    path: data/val-*
---
"""


def make_hub_folder(root: Path, seed: int = 1) -> dict:
    """A local copy of tanganke/nyuv2's layout: README.md configs + data/<split>-*.parquet."""
    rng = np.random.default_rng(seed)
    written = {}
    (root / "data").mkdir(parents=True)
    for split, count in (("train", 4), ("val", 2)):
        samples = [_sample(rng, 13, normals=True) for _ in range(count)]
        columns = {
            "image": [np.moveaxis(s["image"], -1, 0) for s in samples],
            "segmentation": [s["label"].astype(np.int64) for s in samples],
            "depth": [np.moveaxis(s["depth"], -1, 0) for s in samples],
            "normal": [np.moveaxis(s["normal"], -1, 0) for s in samples],
            "noise": [rng.random((1, H, W), dtype=np.float32) for _ in samples],
        }
        table = datasets.Dataset.from_dict(columns, features=HUB_FEATURES)
        table.to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
        written[split] = columns
    (root / "README.md").write_text(HUB_README)
    return written


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    ResNetModel(cfg).save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------- loaders
def test_mtan_loader_returns_the_written_arrays_channel_first(tmp_path: Path) -> None:
    written = make_mtan_tree(tmp_path)
    data = MTANDense(tmp_path, "val")
    assert len(data) == 2
    for i in range(2):
        item, sample = data[i], written["val", i]
        assert set(item) == {
            "pixel_values",
            "labels_segmentation",
            "labels_depth",
            "labels_normals",
        }
        assert item["pixel_values"].dtype == torch.float32
        assert item["labels_segmentation"].dtype == torch.long
        assert item["pixel_values"].shape == (3, H, W)
        assert item["labels_depth"].shape == (1, H, W)
        np.testing.assert_array_equal(item["pixel_values"], np.moveaxis(sample["image"], -1, 0))
        np.testing.assert_array_equal(item["labels_segmentation"], sample["label"])
        np.testing.assert_array_equal(item["labels_depth"], np.moveaxis(sample["depth"], -1, 0))
        np.testing.assert_array_equal(item["labels_normals"], np.moveaxis(sample["normal"], -1, 0))
    assert len(MTANDense(tmp_path, "train", max_samples=3)) == 3


def test_cityscapes_layout_reads_label_7_or_label_19(tmp_path: Path) -> None:
    written = make_mtan_tree(tmp_path, "cityscapes")
    for labels in ("label_7", "label_19"):
        item = MTANDense(tmp_path, "train", layout=cityscapes_layout(labels))[1]
        assert set(item) == {"pixel_values", "labels_segmentation", "labels_depth"}
        np.testing.assert_array_equal(item["labels_segmentation"], written["train", 1][labels])
    with pytest.raises(ValueError, match="label_3"):
        cityscapes_layout("label_3")


def test_hub_loader_matches_the_parquet_columns(tmp_path: Path) -> None:
    written = make_hub_folder(tmp_path / "nyuv2")
    data = HubNYUv2(str(tmp_path / "nyuv2"), "val", cache_dir=str(tmp_path / "cache"))
    assert len(data) == 2
    item = data[1]
    assert set(item) == {"pixel_values", "labels_segmentation", "labels_depth", "labels_normals"}
    assert item["labels_segmentation"].dtype == torch.long
    for key, column in (
        ("pixel_values", "image"),
        ("labels_segmentation", "segmentation"),
        ("labels_depth", "depth"),
        ("labels_normals", "normal"),
    ):
        np.testing.assert_array_equal(item[key], written["val"][column][1])
    train = HubNYUv2(
        str(tmp_path / "nyuv2"), "train", max_samples=3, cache_dir=str(tmp_path / "cache")
    )
    assert len(train) == 3


def test_wrong_shape_names_the_file(tmp_path: Path) -> None:
    make_mtan_tree(tmp_path)
    bad = tmp_path / "train" / "depth" / "2.npy"
    np.save(bad, np.ones((H, W, 2), np.float32))
    with pytest.raises(ValueError, match=str(bad)):
        MTANDense(tmp_path, "train")[2]


# --------------------------------------------------------------------------- missing data
def test_missing_root_names_the_path_the_download_and_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        MTANDense(root, "train")
    message = str(err.value)
    assert f"{root} does not exist" in message
    assert "https://github.com/lorenmt/mtan" in message and "nyuv2.zip" in message
    assert "{train,val}/{image,label,depth,normal}/{i}.npy" in message
    assert "tanganke/nyuv2" in message
    assert not root.exists()  # nothing written


def test_missing_file_is_named_exactly(tmp_path: Path) -> None:
    make_mtan_tree(tmp_path, "cityscapes")
    (tmp_path / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val" / "depth" / "1.npy")) as err:
        MTANDense(tmp_path, "val", layout=cityscapes_layout())
    assert "cityscapes2.zip" in str(err.value)
    assert "{train,val}/{image,label_7,depth}/{i}.npy" in str(err.value)
    (tmp_path / "train" / "label_7").rename(tmp_path / "train" / "labels")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train" / "label_7")):
        MTANDense(tmp_path, "train", layout=cityscapes_layout())


def test_missing_hub_copy_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tanganke/nyuv2") as err:
        HubNYUv2(str(tmp_path / "absent"), "train", cache_dir=str(tmp_path / "cache"))
    assert str(tmp_path / "absent") in str(err.value)
    assert "--source mtan" in str(err.value)


def test_recipe_with_missing_data_fails_before_writing(tmp_path: Path, backbone: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data")):
        _recipe("nyuv2").main(
            [
                "--config",
                str(ROOT / "recipes" / "configs" / "nyuv2.yaml"),
                "--data_root",
                str(tmp_path / "data"),
                "--backbone",
                backbone,
                "--output_dir",
                str(out),
                "--use_cpu",
                "true",
            ]
        )
    assert not out.exists()


# --------------------------------------------------------------------------- augmentation
def _item(seed: int = 0) -> dict[str, torch.Tensor]:
    sample = _sample(np.random.default_rng(seed), 13, normals=True)
    return {
        "pixel_values": torch.from_numpy(np.moveaxis(sample["image"], -1, 0).copy()),
        "labels_segmentation": torch.from_numpy(sample["label"]).long(),
        "labels_depth": torch.from_numpy(np.moveaxis(sample["depth"], -1, 0).copy()),
        "labels_normals": torch.from_numpy(np.moveaxis(sample["normal"], -1, 0).copy()),
    }


def test_flip_mirrors_everything_and_negates_normal_x() -> None:
    item = _item()
    out = hflip(item)
    for key in item:
        assert out[key].shape == item[key].shape
    torch.testing.assert_close(out["pixel_values"], item["pixel_values"].flip(-1))
    torch.testing.assert_close(out["labels_segmentation"], item["labels_segmentation"].flip(-1))
    torch.testing.assert_close(out["labels_depth"], item["labels_depth"].flip(-1))
    normals = item["labels_normals"].flip(-1)
    torch.testing.assert_close(out["labels_normals"][0], -normals[0])
    torch.testing.assert_close(out["labels_normals"][1:], normals[1:])
    torch.testing.assert_close(hflip(out)["labels_normals"], item["labels_normals"])


@pytest.mark.parametrize(("scale", "top", "left"), [(1.5, 3, 5), (1.2, 0, 2), (1.0, 0, 0)])
def test_scale_crop_keeps_shapes_labels_and_invalid_pixels(scale, top, left) -> None:
    item = _item()
    out = scale_crop(item, scale, top, left)
    for key in item:
        assert out[key].shape == item[key].shape and out[key].dtype == item[key].dtype
    h, w = int(H / scale), int(W / scale)
    # nearest source pixel of each output pixel (pixel centres: "nearest-exact")
    rows = top + ((torch.arange(H) + 0.5) * h / H).floor().long()
    cols = left + ((torch.arange(W) + 0.5) * w / W).floor().long()
    source = item["labels_segmentation"][rows][:, cols]
    torch.testing.assert_close(out["labels_segmentation"], source)  # ignore stays ignore
    assert (out["labels_segmentation"] == -1).any()
    depth = item["labels_depth"][:, rows][:, :, cols]
    torch.testing.assert_close(out["labels_depth"], depth / scale)  # MTAN: depth / s
    assert ((out["labels_depth"] == 0) == (depth == 0)).all()
    valid = item["labels_normals"][:, rows][:, :, cols].norm(dim=0) > 0
    norms = out["labels_normals"].norm(dim=0)
    torch.testing.assert_close(norms[valid], torch.ones(int(valid.sum())))
    assert (norms[~valid] == 0).all()
    proportional = scale_crop(item, scale, top, left, depth_scaling="proportional")
    torch.testing.assert_close(proportional["labels_depth"], depth * scale)


def test_augment_is_seeded_and_keeps_shapes() -> None:
    augment = DenseAugment()
    item = _item()
    outs = [augment(item, torch.Generator().manual_seed(3)) for _ in range(2)]
    for key in item:
        torch.testing.assert_close(outs[0][key], outs[1][key])
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        out = augment(item, gen)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in item.items()}
        assert set(out["labels_segmentation"].unique().tolist()) <= set(range(-1, 13))
    flip_only = DenseAugment(scales=(1.0,), flip_prob=1.0)(item, torch.Generator())
    torch.testing.assert_close(flip_only["labels_normals"], hflip(item)["labels_normals"])


def test_augment_validation() -> None:
    with pytest.raises(ValueError, match="scales"):
        DenseAugment(scales=(0.5,))
    with pytest.raises(ValueError, match="flip_prob"):
        DenseAugment(flip_prob=2.0)
    with pytest.raises(ValueError, match="depth_scaling"):
        DenseAugment(depth_scaling="square")


def test_augmented_dataset_draws_from_its_generator(tmp_path: Path) -> None:
    make_mtan_tree(tmp_path)
    items = [
        MTANDense(
            tmp_path, "train", augment=DenseAugment(), generator=torch.Generator().manual_seed(7)
        )[0]
        for _ in range(2)
    ]
    for key in items[0]:
        torch.testing.assert_close(items[0][key], items[1][key])
    plain = MTANDense(tmp_path, "train", normalize=True)[0]
    raw = MTANDense(tmp_path, "train")[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(plain["pixel_values"], (raw["pixel_values"] - mean) / std)


# --------------------------------------------------------------------------- tasks, baselines
def test_task_specs_and_published_baselines() -> None:
    specs = dense_task_specs(["segmentation", "depth", "normals"], 13)
    assert [(s.name, s.type, s.label_column) for s in specs] == [
        ("segmentation", "segmentation", "labels_segmentation"),
        ("depth", "depth", "labels_depth"),
        ("normals", "normals", "labels_normals"),
    ]
    assert specs[0].num_labels == 13 and specs[0].ignore_index == -1
    baselines = task_baselines(specs, NYUV2_BASELINE)
    assert baselines == {
        "segmentation/miou": 0.3830,
        "segmentation/pixel_acc": 0.6376,
        "depth/abs_err": 0.6754,
        "depth/rel_err": 0.2780,
        "normals/mean_angle": 25.01,
        "normals/median_angle": 19.21,
        "normals/within_11.25": 0.3014,
        "normals/within_22.5": 0.5720,
        "normals/within_30": 0.6915,
    }
    higher = {k: k.split("/")[1] in ("miou", "pixel_acc") or "within" in k for k in baselines}
    assert delta_m(baselines, baselines, higher) == 0.0
    city = task_baselines(dense_task_specs(["segmentation", "depth"], 7), CITYSCAPES_BASELINE)
    assert city["depth/rel_err"] == 27.77 and len(city) == 4
    for bad in ([], ["depth", "depth"], ["edges"]):
        with pytest.raises(ValueError, match="tasks"):
            dense_task_specs(bad, 13)
    with pytest.raises(ValueError, match="normals"):
        dense_task_specs(["normals"], 7, allowed=("segmentation", "depth"))


# --------------------------------------------------------------------------- end to end
def _common(backbone: str, out: Path) -> list[str]:
    return [
        "--backbone",
        backbone,
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "2",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--dataloader_num_workers",
        "0",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--decoder_channels",
        "8",
    ]


def _check_results(out: Path, keys: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    for key in [*keys, "eval_delta_m", "eval_loss"]:
        assert math.isfinite(metrics[key]), (key, metrics)
    assert any("loss" in entry for entry in results["log_history"])
    return results


NYUV2_KEYS = [
    f"eval_{k}"
    for k in task_baselines(
        dense_task_specs(["segmentation", "depth", "normals"], 13), NYUV2_BASELINE
    )
]


def test_nyuv2_recipe_end_to_end_on_mtan_files(tmp_path: Path, backbone: str) -> None:
    make_mtan_tree(tmp_path / "data")
    out = tmp_path / "out"
    metrics = _recipe("nyuv2").main(
        [
            "--config",
            str(ROOT / "recipes" / "configs" / "nyuv2.yaml"),
            "--data_root",
            str(tmp_path / "data"),
            *_common(backbone, out),
        ]
    )
    results = _check_results(out, NYUV2_KEYS)
    assert results["metrics"] == pytest.approx(metrics)
    assert results["config"]["mtl_method"] == "ew"


def test_nyuv2_recipe_end_to_end_on_the_hub_layout(tmp_path: Path, backbone: str) -> None:
    make_hub_folder(tmp_path / "nyuv2")
    out = tmp_path / "out"
    _recipe("nyuv2").main(
        [
            "--source",
            "hub",
            "--hub_id",
            str(tmp_path / "nyuv2"),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--max_train_samples",
            "2",
            "--mtl_method",
            "uw",
            "--apt_optimizer",
            "adamw",
            *_common(backbone, out),
        ]
    )
    _check_results(out, NYUV2_KEYS)


def test_cityscapes_recipe_end_to_end_with_a_gradient_method(tmp_path: Path, backbone: str) -> None:
    make_mtan_tree(tmp_path / "data", "cityscapes")
    out = tmp_path / "out"
    _recipe("cityscapes").main(
        [
            "--config",
            str(ROOT / "recipes" / "configs" / "cityscapes.yaml"),
            "--data_root",
            str(tmp_path / "data"),
            "--mtl_method",
            "pcgrad",
            "--apt_optimizer",
            "muon",
            *_common(backbone, out),
        ]
    )
    keys = ["segmentation/miou", "segmentation/pixel_acc", "depth/abs_err", "depth/rel_err"]
    results = _check_results(out, [f"eval_{k}" for k in keys])
    assert not any(k.startswith("eval_normals") for k in results["metrics"])

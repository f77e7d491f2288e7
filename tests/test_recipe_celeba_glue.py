"""CelebA and GLUE recipes: data loading in the hubs' layouts (fabricated locally), task names,
multi-task GLUE batches, the GLUE model and metrics, and both recipes end to end on tiny
backbones."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    EvalPrediction,
    ResNetConfig,
    ResNetModel,
)

from apt_hf import MultiTaskModel
from apt_hf.data.celeba import (
    CELEBA_ATTRIBUTES,
    CELEBA_CONFIG,
    attribute_task_name,
    celeba_task_specs,
    load_celeba,
)
from apt_hf.data.glue import (
    GlueMultiTaskModel,
    TaskZipCollator,
    glue_compute_metrics,
    glue_datasets,
    glue_task_specs,
    load_glue_task,
    matthews_correlation,
    pearson,
    spearman,
)
from apt_hf.recipes import RESULTS_NAME, parse_recipe_args

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "a", "the", "good", "bad", "movie", "film", "great", "awful",
    "plot", "actor", "is", "was", "very", "not", "fun", "dull",
]  # fmt: skip
GLUE_COLUMNS = {
    "sst2": ("sentence",),
    "stsb": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
}
GLUE_SIZES = {  # rows per split; validation sizes differ so evaluation pads the smaller tasks
    "sst2": {"train": 8, "validation": 5, "test": 3},
    "stsb": {"train": 6, "validation": 3, "test": 3},
    "rte": {"train": 6, "validation": 4, "test": 3},
}
SST2_HIDDEN_TRAIN_ROWS = 2  # sst2's fabricated train split has 2 rows labelled -1


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the string annotations through it
    spec.loader.exec_module(module)
    return module


def _write_hub_layout(root: Path, configs: dict[str, dict[str, datasets.Dataset]]) -> None:
    """``configs: {config: {split: dataset}}`` as the hub stores it: one parquet per split under
    ``<config>/`` and a README.md whose YAML ``configs:`` block lists them."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        (root / config).mkdir(parents=True)
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, data in splits.items():
            data.to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def celeba_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celeba")
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "celeb_id": datasets.Value("int64"),
            **{a: datasets.Value("bool") for a in CELEBA_ATTRIBUTES},
        }
    )
    splits = {}
    for split, n in (("train", 6), ("valid", 4), ("test", 2)):
        rows = {
            "image": [
                Image.fromarray(rng.integers(0, 256, (22, 18, 3), dtype=np.uint8)) for _ in range(n)
            ],
            "celeb_id": rng.integers(1, 100, n).tolist(),
            **{a: rng.random(n).__lt__(0.5).tolist() for a in CELEBA_ATTRIBUTES},
        }
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    _write_hub_layout(root, {CELEBA_CONFIG: splits})
    return root


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ResNetModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    configs: dict[str, dict[str, datasets.Dataset]] = {}
    for task, sizes in GLUE_SIZES.items():
        regression = task == "stsb"
        label = (
            datasets.Value("float32")
            if regression
            else datasets.ClassLabel(names=["negative", "positive"])
        )
        features = datasets.Features(
            {
                **{c: datasets.Value("string") for c in GLUE_COLUMNS[task]},
                "label": label,
                "idx": datasets.Value("int32"),
            }
        )
        configs[task] = {}
        for split, n in sizes.items():
            if split == "test":
                labels = [-1] * n  # GLUE's hidden test labels
            elif regression:
                labels = [round(rng.uniform(0, 5), 2) for _ in range(n)]
            else:
                labels = [i % 2 for i in range(n)]
            if task == "sst2" and split == "train":
                labels[:SST2_HIDDEN_TRAIN_ROWS] = [-1] * SST2_HIDDEN_TRAIN_ROWS
            rows = {c: [_sentence(rng) for _ in range(n)] for c in GLUE_COLUMNS[task]}
            rows.update(label=labels, idx=list(range(n)))
            configs[task][split] = datasets.Dataset.from_dict(rows, features=features)
    _write_hub_layout(root, configs)
    return root


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(bert_dir):
    return BertTokenizerFast.from_pretrained(bert_dir)


def _train_args(output_dir: Path) -> list[str]:
    return [
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size",
        "4", "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--logging_steps", "1",
    ]  # fmt: skip


def _finite_results(output_dir: Path, keys: list[str]) -> dict:
    results = json.loads((output_dir / RESULTS_NAME).read_text())
    metrics = results["metrics"]
    missing = [k for k in keys if k not in metrics]
    assert not missing, f"missing {missing} in {sorted(metrics)}"
    assert all(math.isfinite(metrics[k]) for k in keys)
    return results


# ----------------------------------------------------------------------------- CelebA
def test_recipe_configs_parse_with_cli_overrides(tmp_path):
    celeba, glue = _recipe("celeba"), _recipe("glue")
    args, data, model = parse_recipe_args(
        (celeba.DataArguments, celeba.ModelArguments),
        ["--config", str(ROOT / "recipes/configs/celeba.yaml"), "--output_dir", str(tmp_path),
         "--attributes", "Male", "5_o_Clock_Shadow"],
    )  # fmt: skip
    assert data.attributes == ["Male", "5_o_Clock_Shadow"] and data.image_size == 64
    assert model.backbone == "microsoft/resnet-18" and args.metric_for_best_model == "f1_mean"
    assert args.learning_rate == 3e-4 and args.per_device_train_batch_size == 256
    args, data, model = parse_recipe_args(
        (glue.DataArguments, glue.ModelArguments),
        ["--config", str(ROOT / "recipes/configs/glue.yaml"), "--output_dir", str(tmp_path)],
    )
    assert data.tasks == ["sst2", "mrpc", "stsb", "rte", "cola"]
    assert model.backbone == "bert-base-uncased" and args.metric_for_best_model == "glue_score"


def test_attribute_task_names_are_valid_and_unique():
    assert attribute_task_name("5_o_Clock_Shadow") == "a_5_o_Clock_Shadow"
    assert attribute_task_name("Male") == "Male"
    assert attribute_task_name("Wearing_Hat") == "Wearing_Hat"
    assert attribute_task_name("keys") == "a_keys"  # an nn.ModuleDict attribute
    assert attribute_task_name("class") == "a_class"  # a keyword
    assert attribute_task_name("Big-Nose") == "Big_Nose"
    specs = celeba_task_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 40
    assert [n for n in names if n not in CELEBA_ATTRIBUTES] == ["a_5_o_Clock_Shadow"]
    assert all(s.type == "multilabel" and s.num_labels == 1 and s.loss == "bce" for s in specs)
    assert specs[0].label_column == "labels_a_5_o_Clock_Shadow"


def test_celeba_attribute_subset_is_checked():
    assert [s.name for s in celeba_task_specs(["Smiling", "5_o_Clock_Shadow"])] == [
        "Smiling",
        "a_5_o_Clock_Shadow",
    ]
    with pytest.raises(ValueError, match="unknown CelebA attribute.*'Smile'"):
        celeba_task_specs(["Smile"])
    with pytest.raises(ValueError, match="repeated"):
        celeba_task_specs(["Male", "Male"])


def test_load_celeba_gives_pixel_values_and_one_label_per_task(celeba_dir):
    data = load_celeba(
        str(celeba_dir), "valid", attributes=["5_o_Clock_Shadow", "Male"], image_size=16
    )
    raw = datasets.load_dataset(str(celeba_dir), name=CELEBA_CONFIG, split="valid")
    assert len(data) == 4
    row = data[1]
    assert sorted(row) == ["labels_Male", "labels_a_5_o_Clock_Shadow", "pixel_values"]
    assert row["pixel_values"].shape == (3, 16, 16)
    assert row["pixel_values"].dtype == torch.float32
    assert row["labels_Male"].shape == (1,)
    assert row["labels_Male"].item() == float(raw[1]["Male"])
    assert row["labels_a_5_o_Clock_Shadow"].item() == float(raw[1]["5_o_Clock_Shadow"])
    assert len(load_celeba(str(celeba_dir), "train", max_samples=2)) == 2


def test_celeba_missing_data_errors_say_what_where_and_layout(celeba_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_celeba(str(tmp_path / "nowhere"), "train")
    message = str(info.value)
    assert "nowhere" in message
    assert "hf download flwrlabs/celeba --repo-type dataset" in message
    assert f"{CELEBA_CONFIG}/<split>-NNNNN-of-NNNNN.parquet" in message
    with pytest.raises(FileNotFoundError, match="split 'validation'.*Expected layout"):
        load_celeba(str(celeba_dir), "validation")
    with pytest.raises(FileNotFoundError, match="config 'img_align'"):
        load_celeba(str(celeba_dir), "train", config="img_align")

    partial = tmp_path / "partial"
    raw = datasets.load_dataset(str(celeba_dir), name=CELEBA_CONFIG, split="test")
    _write_hub_layout(partial, {CELEBA_CONFIG: {"test": raw.remove_columns(["Young"])}})
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['Young'\].*Expected layout"):
        load_celeba(str(partial), "test")


def test_celeba_recipe_end_to_end(celeba_dir, resnet_dir, tmp_path):
    out = tmp_path / "out"
    metrics = _recipe("celeba").main(
        [
            "--config", str(ROOT / "recipes" / "configs" / "celeba.yaml"),
            "--dataset", str(celeba_dir), "--backbone", str(resnet_dir), "--image_size", "32",
            *_train_args(out),
        ]
    )  # fmt: skip
    names = [s.name for s in celeba_task_specs()]
    keys = [f"eval_{n}/f1" for n in names] + ["eval_f1_mean", "eval_loss"]
    results = _finite_results(out, keys)
    assert results["recipe"] == "celeba"
    assert metrics["eval_f1_mean"] == pytest.approx(
        np.mean([metrics[f"eval_{n}/f1"] for n in names])
    )
    train_logs = [e for e in results["log_history"] if "loss" in e]
    assert "loss/a_5_o_Clock_Shadow" in train_logs[0]
    assert MultiTaskModel.from_pretrained(out).task_names == names


# ----------------------------------------------------------------------------- GLUE
def test_glue_task_specs():
    specs = {s.name: s for s in glue_task_specs(["sst2", "stsb", "mnli", "cola"])}
    assert specs["stsb"].type == "regression" and specs["stsb"].num_labels == 1
    assert specs["mnli"].type == "classification" and specs["mnli"].num_labels == 3
    assert specs["sst2"].num_labels == 2 and specs["cola"].label_column == "labels_cola"
    with pytest.raises(ValueError, match="unknown GLUE task.*'sst'"):
        glue_task_specs(["sst"])


def test_glue_hidden_test_labels_are_excluded(glue_dir, tokenizer):
    train = load_glue_task(str(glue_dir), "sst2", "train", tokenizer)
    assert len(train) == GLUE_SIZES["sst2"]["train"] - SST2_HIDDEN_TRAIN_ROWS
    assert -1 not in train["label"]
    assert sorted(train.column_names) == ["attention_mask", "input_ids", "label", "token_type_ids"]
    for task in ("sst2", "stsb"):
        with pytest.raises(ValueError, match="no labelled row.*GLUE hides its test labels"):
            load_glue_task(str(glue_dir), task, "test", tokenizer)


def test_glue_pairs_are_tokenized_as_pairs(glue_dir, tokenizer):
    row = load_glue_task(str(glue_dir), "rte", "validation", tokenizer)[0]
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(row["token_type_ids"]) == {0, 1}
    truncated = load_glue_task(str(glue_dir), "rte", "train", tokenizer, max_seq_length=6)
    assert max(len(ids) for ids in truncated["input_ids"]) <= 6


def test_glue_batch_holds_every_task(glue_dir, tokenizer):
    specs, train, evaluation = glue_datasets(str(glue_dir), ["sst2", "stsb", "rte"], tokenizer)
    assert len(train) == 6 and len(evaluation) == 5  # the largest task's labelled rows
    collate = TaskZipCollator(tokenizer, specs)
    batch = collate([train[i] for i in range(4)])
    assert sorted(batch["task_inputs"]) == ["rte", "sst2", "stsb"]
    for task, inputs in batch["task_inputs"].items():
        assert inputs["input_ids"].shape[0] == 4, task
        assert inputs["attention_mask"].shape == inputs["input_ids"].shape
        assert batch[f"labels_{task}"].shape == (4,)
    assert batch["labels_stsb"].dtype == torch.float32
    assert batch["labels_sst2"].dtype == torch.long
    # evaluation: every task's rows once, the cycled ones masked with ignore_index
    labels = collate([evaluation[i] for i in range(len(evaluation))])
    assert (labels["labels_stsb"] == -100).tolist() == [False] * 3 + [True] * 2
    assert (labels["labels_rte"] == -100).tolist() == [False] * 4 + [True]
    assert (labels["labels_sst2"] != -100).all()


def test_glue_model_matches_one_task_at_a_time(glue_dir, tokenizer, bert_dir, tmp_path):
    specs, train, _ = glue_datasets(str(glue_dir), ["sst2", "stsb", "rte"], tokenizer)
    model = GlueMultiTaskModel.from_backbone(str(bert_dir), tasks=specs)
    batch = TaskZipCollator(tokenizer, specs)([train[i] for i in range(3)])
    out = model(**batch)
    assert sorted(out.task_losses) == ["rte", "sst2", "stsb"]
    assert out.logits["stsb"].shape == (3, 1) and out.logits["rte"].shape == (3, 2)
    model.save_pretrained(tmp_path / "saved")
    reference = MultiTaskModel.from_pretrained(tmp_path / "saved").eval()  # one task at a time
    for task, inputs in batch["task_inputs"].items():
        alone = reference(**inputs)
        torch.testing.assert_close(out.logits[task], alone.logits[task], atol=1e-5, rtol=1e-4)
    masked = dict(batch, labels_stsb=torch.tensor([1.0, -100.0, -100.0]))
    loss = model(**masked).task_losses["stsb"]
    expected = (out.logits["stsb"][0, 0] - 1.0) ** 2
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="task 'stsb'.*none for this task"):
        model(task_inputs=batch["task_inputs"], labels_sst2=batch["labels_sst2"])

    loaded = GlueMultiTaskModel.from_pretrained(tmp_path / "saved").eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    torch.testing.assert_close(loaded(**batch).logits["sst2"], out.logits["sst2"])


def test_glue_metrics_match_references():
    stats = pytest.importorskip("scipy.stats")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for classes in (2, 3):
        pred, ref = rng.integers(0, classes, 50), rng.integers(0, classes, 50)
        assert matthews_correlation(pred, ref) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(ref, pred)
        )
    assert matthews_correlation(np.ones(5, int), np.array([0, 1, 0, 1, 1])) == 0.0
    x, y = rng.normal(size=40), rng.normal(size=40)
    y_ties = np.round(y)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y_ties) == pytest.approx(stats.spearmanr(x, y_ties)[0])
    assert pearson(x, np.ones(40)) == 0.0


def test_glue_compute_metrics_skips_masked_entries():
    specs = glue_task_specs(["mrpc", "stsb", "cola"])
    prediction = EvalPrediction(
        predictions={
            "mrpc": np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
            "stsb": np.array([[1.0], [2.0], [3.0], [9.0]]),
            "cola": np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
        },
        label_ids={
            "mrpc": np.array([1, 0, 0, -100]),
            "stsb": np.array([1.5, 2.5, 2.0, -100.0]),
            "cola": np.array([1, 0, 1, 0]),
        },
    )
    out = glue_compute_metrics(specs, {"mrpc/accuracy": 0.5, "cola/matthews_correlation": 0.5})(
        prediction
    )
    assert out["mrpc/accuracy"] == pytest.approx(2 / 3)
    assert out["mrpc/f1"] == pytest.approx(2 / 3)
    assert out["stsb/pearson"] == pytest.approx(
        pearson(np.array([1, 2, 3]), np.array([1.5, 2.5, 2]))
    )
    assert out["stsb/spearmanr"] == pytest.approx(0.5)
    assert out["cola/matthews_correlation"] == pytest.approx(0.0)
    task_means = [(2 / 3 + 2 / 3) / 2, (out["stsb/pearson"] + 0.5) / 2, 0.0]
    assert out["glue_score"] == pytest.approx(np.mean(task_means))
    # Delta_m = 100/2 * (-(2/3 - 0.5)/0.5 - (0 - 0.5)/0.5)
    assert out["delta_m"] == pytest.approx(50 * (-(2 / 3 - 0.5) / 0.5 + 1.0))


def test_glue_missing_data_errors(tmp_path, glue_dir, tokenizer):
    with pytest.raises(FileNotFoundError) as info:
        load_glue_task(str(tmp_path / "nowhere"), "sst2", "train", tokenizer)
    message = str(info.value)
    assert "hf download nyu-mll/glue --repo-type dataset" in message
    assert "DIR/<task>/<split>-NNNNN-of-NNNNN.parquet" in message
    with pytest.raises(FileNotFoundError, match="config 'cola'.*Expected layout"):
        load_glue_task(str(glue_dir), "cola", "train", tokenizer)


def test_glue_recipe_end_to_end(glue_dir, bert_dir, tmp_path):
    out = tmp_path / "out"
    metrics = _recipe("glue").main(
        [
            "--config", str(ROOT / "recipes" / "configs" / "glue.yaml"),
            "--dataset", str(glue_dir), "--backbone", str(bert_dir),
            "--tasks", "sst2", "stsb", "rte", "--mtl_method", "pcgrad", *_train_args(out),
        ]
    )  # fmt: skip
    keys = [
        "eval_sst2/accuracy",
        "eval_stsb/pearson",
        "eval_stsb/spearmanr",
        "eval_rte/accuracy",
        "eval_glue_score",
        "eval_loss",
    ]
    results = _finite_results(out, keys)
    assert results["recipe"] == "glue" and results["config"]["mtl_method"] == "pcgrad"
    assert metrics["eval_glue_score"] == results["metrics"]["eval_glue_score"]
    train_logs = [e for e in results["log_history"] if "loss" in e]
    assert all(f"loss/{t}" in train_logs[0] for t in ("sst2", "stsb", "rte"))
    assert GlueMultiTaskModel.from_pretrained(out).task_names == ["sst2", "stsb", "rte"]
    assert (out / "tokenizer_config.json").is_file()

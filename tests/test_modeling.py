"""MultiTaskModel on tiny BERT / ResNet / ViT backbones built from configs (offline, CPU)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    PreTrainedConfig,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
)

from apt_hf.modeling import (
    TASK_LOSSES,
    MultiTaskConfig,
    MultiTaskModel,
    MultiTaskOutput,
    TaskSpec,
    task_loss,
)
from apt_hf.optim import split_parameters

B, S, HW = 4, 9, 32


def bert_config(**kwargs: object) -> BertConfig:
    return BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **kwargs,
    )


def resnet_config() -> ResNetConfig:
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)


def vit_config() -> ViTConfig:
    return ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


TEXT_TASKS = [
    TaskSpec("sst2", num_labels=2, weight=0.5),
    TaskSpec("stsb", type="regression", weight=2.0),
    TaskSpec("topics", type="multilabel", num_labels=4),
    TaskSpec("ner", type="token_classification", num_labels=5),
]
IMAGE_TASKS = [
    TaskSpec("scene", num_labels=3),
    TaskSpec("seg", type="segmentation", num_labels=4, ignore_index=-1),
    TaskSpec("depth", type="depth", weight=0.7),
    TaskSpec("normals", type="normals"),
]


def text_model(tasks: list[TaskSpec] = TEXT_TASKS, **kwargs: object) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=tasks, **kwargs))


def image_model(backbone: PreTrainedConfig, tasks: list[TaskSpec] = IMAGE_TASKS) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(MultiTaskConfig(backbone_config=backbone, tasks=tasks))


def text_batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    ner = torch.randint(0, 5, (B, S), generator=g)
    ner[:, 0] = -100
    return {
        "input_ids": torch.randint(1, 100, (B, S), generator=g),
        "attention_mask": torch.ones(B, S, dtype=torch.long),
        "labels_sst2": torch.randint(0, 2, (B,), generator=g),
        "labels_stsb": torch.rand(B, generator=g) * 5,
        "labels_topics": torch.randint(0, 2, (B, 4), generator=g).float(),
        "labels_ner": ner,
    }


def image_batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    seg = torch.randint(-1, 4, (B, HW, HW), generator=g)
    depth = torch.rand(B, 1, HW, HW, generator=g)
    depth[:, :, :4] = 0  # invalid pixels
    normals = torch.nn.functional.normalize(torch.randn(B, 3, HW, HW, generator=g), dim=1)
    normals[:, :, -4:] = 0
    return {
        "pixel_values": torch.randn(B, 3, HW, HW, generator=g),
        "labels_scene": torch.randint(0, 3, (B,), generator=g),
        "labels_seg": seg,
        "labels_depth": depth,
        "labels_normals": normals,
    }


def assert_state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----- TaskSpec -----


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "1st"}, "name"),
        ({"name": "a-b"}, "name"),
        ({"name": "class"}, "name"),
        ({"name": "keys"}, "name"),
        ({"type": "ranking"}, "type"),
        ({"num_labels": 0}, "num_labels"),
        ({"num_labels": 1}, "num_labels"),
        ({"num_labels": None}, "num_labels"),
        ({"num_labels": 2.0}, "num_labels"),
        ({"type": "multilabel", "num_labels": 0}, "num_labels"),
        ({"type": "regression", "num_labels": 0}, "num_labels"),
        ({"type": "depth", "num_labels": 2}, "num_labels"),
        ({"type": "normals", "num_labels": 1}, "num_labels"),
        ({"loss": "mse"}, "loss"),
        ({"type": "regression", "loss": "bce"}, "loss"),
        ({"weight": -1.0}, "weight"),
        ({"weight": math.nan}, "weight"),
        ({"weight": math.inf}, "weight"),
        ({"weight": "1"}, "weight"),
        ({"ignore_index": 1.5}, "ignore_index"),
        ({"ignore_index": 1}, "ignore_index"),
        ({"label_column": ""}, "label_column"),
        ({"label_column": "labels"}, "label_column"),
        ({"label_column": "input_ids"}, "label_column"),
        ({"allow_missing_labels": "yes"}, "allow_missing_labels"),
    ],
)
def test_task_spec_rejects_bad_field(kwargs: dict, field: str) -> None:
    full = {"name": "sst2", "num_labels": 3, **kwargs}
    with pytest.raises(ValueError, match=rf"\.?{field}=") as info:
        TaskSpec(**full)
    assert "invalid" in str(info.value)


def test_task_spec_message_names_task_value_and_rule() -> None:
    with pytest.raises(ValueError) as info:
        TaskSpec(name="sst2", num_labels=0)
    assert str(info.value).startswith("TaskSpec(name='sst2').num_labels=0 is invalid: ")
    assert ">= 2" in str(info.value)


def test_task_spec_defaults_and_round_trip() -> None:
    for task_type, losses in TASK_LOSSES.items():
        n = {"classification": 3, "token_classification": 3, "segmentation": 3, "multilabel": 2}
        spec = TaskSpec("t", type=task_type, num_labels=n.get(task_type))
        assert spec.loss == losses[0]
        assert spec.label_column == "labels_t"
        assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert TaskSpec("r", type="regression").num_labels == 1
    assert TaskSpec("d", type="depth").num_labels == 1
    assert TaskSpec("n", type="normals").num_labels == 3
    with pytest.raises(ValueError, match="unknown field"):
        TaskSpec.from_dict({"name": "a", "num_labels": 2, "classes": 3})


# ----- MultiTaskConfig -----


def test_config_round_trip(tmp_path: Path) -> None:
    config = MultiTaskConfig(
        backbone_config=bert_config(), tasks=TEXT_TASKS, head_hidden_size=16, head_dropout=0.2
    )
    assert all(isinstance(t, dict) for t in config.tasks)
    assert config.task_specs == TEXT_TASKS
    assert MultiTaskConfig.sub_configs == {"backbone_config": AutoConfig}
    config.save_pretrained(tmp_path)
    for loaded in (MultiTaskConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is MultiTaskConfig
        assert type(loaded.backbone_config) is BertConfig
        assert loaded.backbone_config.hidden_size == 32
        assert loaded.task_specs == TEXT_TASKS
        a, b = loaded.to_dict(), config.to_dict()
        a.pop("_name_or_path"), b.pop("_name_or_path")
        assert a == b
    as_dict = config.to_dict()
    assert as_dict["backbone_config"]["model_type"] == "bert"
    assert MultiTaskConfig.from_dict(as_dict).to_dict() == as_dict


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": [TaskSpec("a", num_labels=2), TaskSpec("a", num_labels=3)]}, "name"),
        (
            {
                "tasks": [
                    TaskSpec("a", num_labels=2, label_column="y"),
                    TaskSpec("b", num_labels=2, label_column="y"),
                ]
            },
            "label_column",
        ),
        ({"backbone_config": {"hidden_size": 32}}, "model_type"),
        ({"head_dropout": 1.0}, "head_dropout"),
        ({"head_hidden_size": 0}, "head_hidden_size"),
        ({"dense_decoder_channels": 0}, "dense_decoder_channels"),
        ({"pooling": "max"}, "pooling"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiTaskConfig(**{"backbone_config": bert_config(), **kwargs})


def test_model_needs_backbone_and_tasks() -> None:
    with pytest.raises(ValueError, match="backbone_config is None"):
        MultiTaskModel(MultiTaskConfig(tasks=TEXT_TASKS))
    with pytest.raises(ValueError, match="tasks is empty"):
        MultiTaskModel(MultiTaskConfig(backbone_config=bert_config()))
    with pytest.raises(ValueError, match="segmentation needs an image backbone"):
        text_model([TaskSpec("s", type="segmentation", num_labels=3)])
    with pytest.raises(ValueError, match="token_classification needs"):
        image_model(resnet_config(), [TaskSpec("t", type="token_classification", num_labels=3)])


def test_heads_initialised_from_config() -> None:
    config = MultiTaskConfig(
        backbone_config=resnet_config(), tasks=IMAGE_TASKS, initializer_range=0.1
    )
    model = MultiTaskModel(config)
    fuse = model.heads["seg"].fuse
    assert fuse.weight.std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.count_nonzero(fuse.bias) == 0
    assert model.label_columns == [f"labels_{s.name}" for s in IMAGE_TASKS]


# ----- forward -----


@pytest.mark.parametrize("pooling", ["auto", "pooler", "cls", "mean"])
def test_pooling_options(pooling: str) -> None:
    model = text_model(TEXT_TASKS[:1], pooling=pooling).eval()
    batch = text_batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits["sst2"].shape == (B, 2)


def test_cls_pooling_needs_tokens() -> None:
    config = MultiTaskConfig(backbone_config=resnet_config(), tasks=IMAGE_TASKS[:1], pooling="cls")
    with pytest.raises(ValueError, match="pooling='cls'.*feature maps"):
        MultiTaskModel(config)(pixel_values=torch.randn(2, 3, HW, HW))


def test_forward_bert_all_sequence_tasks() -> None:
    model = text_model(head_hidden_size=16).eval()
    batch = text_batch()
    out = model(**batch)
    assert isinstance(out, MultiTaskOutput)
    shapes = {name: tuple(v.shape) for name, v in out.logits.items()}
    assert shapes == {"sst2": (B, 2), "stsb": (B, 1), "topics": (B, 4), "ner": (B, S, 5)}
    assert set(out.task_losses) == set(model.task_names)
    expected = sum(s.weight * out.task_losses[s.name] for s in TEXT_TASKS)
    torch.testing.assert_close(out.loss, expected)
    # The same labels as one dict give the same output.
    labels = {s.name: batch.pop(s.label_column) for s in TEXT_TASKS}
    again = model(**batch, labels=labels)
    torch.testing.assert_close(again.loss, out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backbone", [resnet_config, vit_config], ids=["resnet", "vit"])
def test_forward_image_tasks(backbone) -> None:
    tasks = IMAGE_TASKS if backbone is resnet_config else IMAGE_TASKS[:2]
    model = image_model(backbone(), tasks)
    batch = image_batch()
    out = model(**{k: v for k, v in batch.items() if k in ["pixel_values"] + model.label_columns})
    expected_shapes = {
        "scene": (B, 3),
        "seg": (B, 4, HW, HW),
        "depth": (B, 1, HW, HW),
        "normals": (B, 3, HW, HW),
    }
    assert {n: tuple(v.shape) for n, v in out.logits.items()} == {
        s.name: expected_shapes[s.name] for s in tasks
    }
    if "normals" in out.logits:
        norms = out.logits["normals"].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    expected = sum(s.weight * out.task_losses[s.name] for s in tasks)
    torch.testing.assert_close(out.loss, expected)
    assert all(torch.isfinite(v) for v in out.task_losses.values())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dense_logits_follow_label_size() -> None:
    model = image_model(resnet_config(), IMAGE_TASKS[1:2]).eval()
    pixels = torch.randn(2, 3, HW, HW)
    out = model(pixel_values=pixels, labels_seg=torch.zeros(2, 16, 16, dtype=torch.long))
    assert out.logits["seg"].shape == (2, 4, 16, 16)
    assert model(pixel_values=pixels).logits["seg"].shape == (2, 4, HW, HW)


def test_inference_without_labels() -> None:
    model = text_model().eval()
    out = model(input_ids=text_batch()["input_ids"])
    assert out.loss is None and out.task_losses == {}
    assert set(out.logits) == set(model.task_names)
    as_tuple = model(input_ids=text_batch()["input_ids"], return_dict=False)
    assert isinstance(as_tuple, tuple)


def test_missing_labels_error_and_allow_missing_skip() -> None:
    batch = text_batch()
    del batch["labels_stsb"]
    with pytest.raises(ValueError, match=r"task 'stsb'.*'labels_stsb'.*allow_missing_labels"):
        text_model()(**batch)
    tasks = [*TEXT_TASKS[:1], TaskSpec("stsb", type="regression", allow_missing_labels=True)]
    tasks += TEXT_TASKS[2:]
    out = text_model(tasks)(**batch)
    assert "stsb" not in out.task_losses and "stsb" in out.logits
    torch.testing.assert_close(
        out.loss, sum(s.weight * out.task_losses[s.name] for s in tasks if s.name != "stsb")
    )


def test_bad_label_arguments() -> None:
    model = text_model()
    batch = text_batch()
    with pytest.raises(TypeError, match="labels_cola"):
        model(**batch, labels_cola=torch.zeros(B, dtype=torch.long))
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="unknown task"):
        model(input_ids=ids, labels={"cola": torch.zeros(B)})
    with pytest.raises(ValueError, match="given twice"):
        model(**batch, labels={"sst2": batch["labels_sst2"]})
    with pytest.raises(TypeError, match="dict"):
        model(input_ids=ids, labels=batch["labels_sst2"])


@pytest.mark.parametrize(
    ("task", "labels", "match"),
    [
        ("sst2", torch.zeros(B, 1, dtype=torch.long), "shape"),
        ("sst2", torch.zeros(B + 1, dtype=torch.long), "shape"),
        ("sst2", torch.zeros(B), "dtype"),
        ("sst2", torch.tensor([0, 1, 2, 1]), "values"),
        ("sst2", torch.tensor([0, 1, -5, 1]), "values"),
        ("stsb", torch.zeros(B, dtype=torch.long), "dtype"),
        ("stsb", torch.zeros(B, 2), "shape"),
        ("stsb", torch.tensor([0.0, math.nan, 1.0, 2.0]), "values"),
        ("topics", torch.zeros(B, 3), "shape"),
        ("topics", torch.full((B, 4), 2.0), "values"),
        ("ner", torch.zeros(B, S - 1, dtype=torch.long), "shape"),
        ("ner", torch.full((B, S), 5), "values"),
    ],
)
def test_wrong_text_labels_raise(task: str, labels: Tensor, match: str) -> None:
    batch = text_batch()
    batch[f"labels_{task}"] = labels
    with pytest.raises(ValueError, match=rf"task '{task}' .*labels {match} must be"):
        text_model()(**batch)


@pytest.mark.parametrize(
    ("task", "labels", "match"),
    [
        ("seg", torch.zeros(B, 1, HW, HW, dtype=torch.long), "shape"),
        ("seg", torch.zeros(B, HW, HW), "dtype"),
        ("seg", torch.full((B, HW, HW), 4), "values"),
        ("depth", torch.zeros(B, 2, HW, HW), "shape"),
        ("depth", torch.zeros(B, HW, HW, dtype=torch.long), "dtype"),
        ("normals", torch.zeros(B, HW, HW), "shape"),
    ],
)
def test_wrong_dense_labels_raise(task: str, labels: Tensor, match: str) -> None:
    batch = image_batch()
    batch[f"labels_{task}"] = labels
    with pytest.raises(ValueError, match=rf"task '{task}' .*labels {match} must be"):
        image_model(resnet_config())(**batch)


def test_losses_mask_ignored_and_invalid_entries() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    spec = TaskSpec("c", num_labels=4)
    ignored = task_loss(spec, logits, torch.full((3,), -100))
    assert ignored.item() == 0.0 and ignored.requires_grad
    labels = torch.tensor([1, -100, 3])
    torch.testing.assert_close(
        task_loss(spec, logits, labels), torch.nn.functional.cross_entropy(logits, labels)
    )

    multilabel = TaskSpec("m", type="multilabel", num_labels=4)
    targets = torch.tensor([[1.0, 0.0, -100.0, 1.0]] * 3)
    valid = targets != -100
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[valid], targets[valid])
    torch.testing.assert_close(task_loss(multilabel, logits, targets), expected)

    pred = torch.rand(2, 1, 5, 5)
    depth = torch.rand(2, 1, 5, 5) + 0.1
    depth[:, :, 0] = 0
    mask = depth != 0
    expected = (pred[mask] - depth[mask]).abs().mean()
    torch.testing.assert_close(task_loss(TaskSpec("d", type="depth"), pred, depth[:, 0]), expected)

    normals = torch.nn.functional.normalize(torch.randn(2, 3, 5, 5), dim=1)
    target = normals.clone()
    target[:, :, 0] = 0  # invalid pixels, far from the prediction
    loss = task_loss(TaskSpec("n", type="normals"), normals, target)
    assert loss.abs().item() < 1e-6


# ----- save / load -----


@pytest.mark.parametrize("backbone", [bert_config, resnet_config], ids=["bert", "resnet"])
def test_save_and_from_pretrained_round_trip(tmp_path: Path, backbone) -> None:
    if backbone is bert_config:
        model, batch = text_model(), text_batch()
    else:
        model, batch = image_model(resnet_config()), image_batch()
    model.train()
    model(**batch).loss.backward()  # moves BatchNorm running stats away from their init
    model.save_pretrained(tmp_path)
    for loader in (MultiTaskModel, AutoModel):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is MultiTaskModel
        assert_state_dicts_equal(model, loaded)
        assert loaded.config.task_specs == model.config.task_specs
    model.eval()
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def test_auto_classes_after_import(tmp_path: Path) -> None:
    import apt_hf.modeling  # noqa: F401  (registration happens on import)

    text_model().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MultiTaskConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is MultiTaskModel


@pytest.mark.parametrize("kind", ["bert", "resnet"])
def test_from_backbone_loads_saved_weights(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(3)
    backbone = BertModel(bert_config()) if kind == "bert" else ResNetModel(resnet_config())
    with torch.no_grad():  # weights no initialisation would produce
        for p in backbone.parameters():
            p.add_(torch.randn_like(p))
    backbone.save_pretrained(tmp_path)
    tasks = TEXT_TASKS[:2] if kind == "bert" else [t.to_dict() for t in IMAGE_TASKS[:3]]
    model = MultiTaskModel.from_backbone(tmp_path, tasks, head_hidden_size=8)
    assert_state_dicts_equal(backbone, model.backbone)
    attn = model.backbone.config._attn_implementation
    assert attn is not None and attn == backbone.config._attn_implementation
    assert model.config.head_hidden_size == 8
    assert model.task_names == [t.name if isinstance(t, TaskSpec) else t["name"] for t in tasks]
    assert not model.training


# ----- parameters -----


def test_shared_and_task_parameters_split() -> None:
    model = text_model()
    shared = dict(model.shared_parameters())
    per_task = model.task_parameters()
    task_names = [n for params in per_task.values() for n, _ in params]
    assert set(per_task) == set(model.task_names)
    assert not shared.keys() & set(task_names)
    assert len(task_names) == len(set(task_names))
    assert shared.keys() | set(task_names) == {n for n, _ in model.named_parameters()}
    assert all(n.startswith("backbone.") for n in shared)

    split = split_parameters(model, heads=model.head_module_names())
    assert model.head_module_names() == [f"heads.{t}" for t in model.task_names]
    assert set(split.heads) == set(task_names)
    assert set(split.shared) == set(shared)
    assert split.muon  # the backbone's hidden matrices

    model.backbone.requires_grad_(False)
    assert model.shared_parameters() == []
    with pytest.raises(ValueError, match="leaves no shared parameter"):
        model.check_shared()


# ----- gradient checkpointing -----


def test_gradient_checkpointing_keeps_losses() -> None:
    batch = text_batch()
    losses = []
    for checkpointing in (False, True):
        model = text_model()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.x
                model.gradient_checkpointing_enable()
            assert model.backbone.encoder.layer[0].gradient_checkpointing
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for step in range(3):
            torch.manual_seed(step)  # same dropout masks in both runs
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]

    with pytest.raises(ValueError, match="ResNetModel does not support it"):
        image_model(resnet_config(), IMAGE_TASKS[:1]).activation_checkpointing_enable()

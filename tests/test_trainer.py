"""APTTrainer: equivalence with the stock Trainer, accumulation, resume, logging, bad input."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, ResNetConfig, Trainer, TrainingArguments

from apt_hf import APTConfig, APTTrainer, MultiTaskModel, TaskSpec

SEQ = 8


class TextTasks(Dataset):
    """Random token sequences; 'topic' (3 classes) and 'score' (regression) targets."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 100, (n, SEQ), generator=gen)
        self.topic = self.ids[:, 1] % 3
        self.score = self.ids.float().mean(1) / 50.0 - 1.0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels_topic": self.topic[i],
            "labels_score": self.score[i],
        }


class ImageTasks(Dataset):
    def __init__(self, n: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=gen)
        self.a = (self.x.mean((1, 2, 3)) > 0).long()
        self.b = self.x[:, 0].mean((1, 2))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels_a": self.a[i], "labels_b": self.b[i]}


TEXT_TASKS = [
    TaskSpec(name="topic", type="classification", num_labels=3),
    TaskSpec(name="score", type="regression", num_labels=1),
]


def text_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MultiTaskModel(_mt_config(cfg, TEXT_TASKS))


def _mt_config(backbone, tasks):
    from apt_hf.modeling import MultiTaskConfig

    return MultiTaskConfig(
        backbone_config=backbone, tasks=[t.to_dict() for t in tasks], head_dropout=0.0
    )


def vision_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    tasks = [
        TaskSpec(name="a", type="classification", num_labels=2),
        TaskSpec(name="b", type="regression", num_labels=1),
    ]
    return MultiTaskModel(_mt_config(cfg, tasks))


def _common(output_dir) -> dict:
    return {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": [],
        "seed": 0,
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def apt_args(tmp_path, **kw) -> APTConfig:
    return APTConfig(**{**_common(tmp_path / "out"), **kw})


def stock_args(tmp_path, **kw) -> TrainingArguments:
    """The stock Trainer on the same run, with torch's AdamW and our label columns."""
    return TrainingArguments(
        **{
            **_common(tmp_path / "ref"),
            "optim": "adamw_torch",
            "label_names": ["labels_topic", "labels_score"],
            **kw,
        }
    )


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ equivalence with the stock
def _train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


def test_ew_adamw_apt_off_equals_stock_trainer(tmp_path):
    """Loss, grad norm and final parameters equal the stock Trainer on the summed loss."""
    data = TextTasks()
    ours = text_model()
    args = apt_args(
        tmp_path,
        mtl_method="ew",
        apt_optimizer="adamw",
        apt=False,
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    trainer = APTTrainer(model=ours, args=args, train_dataset=data)
    trainer.train()
    ref = text_model()
    stock = Trainer(
        model=ref,
        args=stock_args(tmp_path, weight_decay=0.01, max_grad_norm=1.0),
        train_dataset=data,
    )
    stock.train()
    for a, b in zip(_train_logs(trainer), _train_logs(stock), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (n, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_accumulation_1x4_equals_4x1(tmp_path, method):
    data = TextTasks(n=16)
    big = text_model()
    APTTrainer(
        model=big,
        args=apt_args(
            tmp_path / "a",
            mtl_method=method,
            apt_optimizer="adamw",  # bf16 Newton-Schulz would amplify summation-order rounding
            max_steps=3,
            per_device_train_batch_size=4,
        ),
        train_dataset=data,
    ).train()
    small = text_model()
    trainer = APTTrainer(
        model=small,
        args=apt_args(
            tmp_path / "b",
            mtl_method=method,
            apt_optimizer="adamw",
            max_steps=3,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
        ),
        train_dataset=data,
    )
    calls = []
    if method == "pcgrad":
        original = trainer.mtl_method.aggregate
        trainer.mtl_method.aggregate = lambda rows, losses: (
            calls.append(1) or original(rows, losses)
        )
    trainer.train()
    if method == "pcgrad":
        assert len(calls) == 3  # once per optimizer step, not per micro-batch
    for (n, a), b in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------ every parameter trains
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("kind", ["text", "vision"])
def test_every_trainable_parameter_changes(tmp_path, kind, optimizer):
    model, data = (text_model(), TextTasks()) if kind == "text" else (vision_model(), ImageTasks())
    before = _params(model)
    trainer = APTTrainer(
        model=model,
        args=apt_args(
            tmp_path, mtl_method="pcgrad", apt_optimizer=optimizer, apt=True, learning_rate=1e-2
        ),
        train_dataset=data,
    )
    trainer.train()
    unchanged = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and torch.equal(p.detach(), before[n])
    ]
    assert unchanged == []
    logs = _train_logs(trainer)[-1]
    for key in (
        "loss/" + model.task_names[0],
        "apt/beta_mean",
        "apt/cos_mean",
        "apt/instant_share",
        "mtl/nonfinite_skipped",
    ):
        assert key in logs, (key, logs)
    group_lrs = [v for k, v in logs.items() if k.startswith("lr/")]
    assert group_lrs and logs["learning_rate"] == pytest.approx(group_lrs[0])  # same moment
    assert f"weight/{model.task_names[0]}" in logs


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("method", ["pcgrad", "uw"])
def test_resume_is_bit_identical(tmp_path, method):
    data = TextTasks()
    full = text_model()
    APTTrainer(
        model=full,
        args=apt_args(tmp_path / "full", mtl_method=method, max_steps=6),
        train_dataset=data,
    ).train()
    first = text_model()
    APTTrainer(
        model=first,
        args=apt_args(
            tmp_path / "run", mtl_method=method, max_steps=6, save_strategy="steps", save_steps=3
        ),
        train_dataset=data,
    ).train()
    resumed = text_model(seed=123)  # different init: everything must come from the checkpoint
    trainer = APTTrainer(
        model=resumed,
        args=apt_args(tmp_path / "run", mtl_method=method, max_steps=6),
        train_dataset=data,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "out" / "checkpoint-3"))
    assert os.path.isfile(tmp_path / "run" / "out" / "checkpoint-3" / "mtl_method.pt")
    for (n, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", ["pcgrad", "uw"])
def test_nonfinite_loss_skips_the_step(tmp_path, method):
    data = TextTasks()
    model = text_model()
    trainer = APTTrainer(
        model=model,
        # the poisoned forward below hides the signature Trainer would filter columns with
        args=apt_args(tmp_path, mtl_method=method, max_steps=2, remove_unused_columns=False),
        train_dataset=data,
    )
    trainer.create_optimizer()
    original = model.forward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        out.task_losses["score"] = out.task_losses["score"] * float("nan")
        return out

    model.forward = poisoned
    before = _params(model)
    with pytest.warns(RuntimeWarning, match="non-finite task loss"):
        trainer.train()
    assert trainer.nonfinite_skipped == 2
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    state = (
        trainer.optimizer.optimizer.state
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer.state
    )
    assert all(
        all(torch.isfinite(v).all() for v in s.values() if torch.is_tensor(v))
        for s in state.values()
    )
    assert _train_logs(trainer)[-1]["mtl/nonfinite_skipped"] == 2


def test_missing_task_labels_raise(tmp_path):
    class NoScore(TextTasks):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item.pop("labels_score")
            return item

    trainer = APTTrainer(model=text_model(), args=apt_args(tmp_path), train_dataset=NoScore())
    with pytest.raises(ValueError, match="score"):
        trainer.train()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mtl_method": "gradsurgery"}, "mtl_method='gradsurgery'"),
        ({"apt_optimizer": "sgd"}, "apt_optimizer='sgd'"),
        ({"apt_beta_min": 1.5}, "apt_beta_min=1.5"),
        ({"apt_direction_preservation": "col"}, "apt_direction_preservation='col'"),
        ({"mtl_method_kwargs": "{not json"}, "mtl_method_kwargs"),
    ],
)
def test_bad_config_raises(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apt_args(tmp_path, **kwargs)


def test_non_multitask_model_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="multi-task model"):
        APTTrainer(model=torch.nn.Linear(2, 2), args=apt_args(tmp_path))


def test_no_shared_parameter_raises(tmp_path):
    model = text_model()
    for _, p in model.shared_parameters():
        p.requires_grad_(False)
    trainer = APTTrainer(
        model=model, args=apt_args(tmp_path, mtl_method="pcgrad"), train_dataset=TextTasks()
    )
    with pytest.raises(ValueError, match="shared parameter"):
        trainer.train()


# ------------------------------------------------------------------ evaluation and the card
def test_evaluation_gives_dicts_and_card_lists_the_run(tmp_path, monkeypatch):
    seen = {}

    def compute_metrics(pred):
        seen["pred"] = pred
        acc = (pred.predictions["topic"].argmax(-1) == pred.label_ids["topic"]).mean()
        return {"topic/accuracy": float(acc)}

    trainer = APTTrainer(
        model=text_model(),
        args=apt_args(tmp_path, mtl_method="mgda"),
        train_dataset=TextTasks(),
        eval_dataset=TextTasks(n=12, seed=1),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert set(seen["pred"].predictions) == {"topic", "score"}
    assert seen["pred"].predictions["topic"].shape == (12, 3)
    assert seen["pred"].label_ids["score"].shape == (12,)
    assert 0.0 <= metrics["eval_topic/accuracy"] <= 1.0

    uploads = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads["repo_id"] = repo_id
            uploads["files"] = sorted(os.listdir(folder_path))
            uploads["card"] = Path(folder_path, "README.md").read_text()
            return "ok"

    import transformers.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "hf_api", lambda *a, **k: FakeApi())
    trainer.push_to_hub()
    assert uploads["repo_id"] == "me/out"
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploads["files"])
    card = uploads["card"]
    for needle in (
        "- apt-hf",
        "- multi-task-learning",
        "`mgda`",
        "bert",
        "| topic |",
        "| score |",
        "APT:** on",
        "topic/accuracy",
    ):
        assert needle in card, needle
    assert not math.isnan(metrics["eval_loss"])
    trainer.save_model(str(tmp_path / "saved"))  # a save you ask for writes the card too
    saved_card = (tmp_path / "saved" / "README.md").read_text()
    assert "- apt-hf" in saved_card and "| topic |" in saved_card


# ------------------------------------------------------------------ config from CLI / YAML
def test_aptconfig_from_cli_and_yaml(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(APTConfig)
    (cli,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--mtl_method",
            "cagrad",
            "--mtl_method_kwargs",
            '{"c": 0.2}',
            "--apt_optimizer",
            "adamw",
            "--apt_beta_min",
            "0.6",
            "--apt",
            "false",
        ]
    )
    assert (cli.mtl_method, cli.mtl_method_kwargs, cli.apt_optimizer) == (
        "cagrad",
        {"c": 0.2},
        "adamw",
    )
    assert cli.apt_beta_min == 0.6 and cli.apt is False
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"output_dir: {tmp_path}\nmtl_method: nash_mtl\nmuon_lr: 0.01\n"
        "apt_direction_preservation: row\ntask_baselines:\n  topic/accuracy: 0.5\n"
    )
    (from_yaml,) = parser.parse_yaml_file(str(yaml_file))
    assert from_yaml.mtl_method == "nash_mtl" and from_yaml.muon_lr == 0.01
    assert from_yaml.apt_direction_preservation == "row"
    assert from_yaml.task_baselines == {"topic/accuracy": 0.5}
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--mtl_method", "x"])


def test_bf16_training_runs_and_changes_parameters(tmp_path):
    model = text_model()
    before = _params(model)
    APTTrainer(
        model=model,
        args=apt_args(tmp_path, mtl_method="pcgrad", bf16=True),
        train_dataset=TextTasks(),
    ).train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)


def test_ready_made_metrics_and_delta_m(tmp_path):
    from apt_hf.metrics import multitask_compute_metrics

    model = text_model()
    baselines = {"topic/accuracy": 0.5, "score/mae": 0.2}
    trainer = APTTrainer(
        model=model,
        args=apt_args(tmp_path, mtl_method="ew", task_baselines=baselines),
        train_dataset=TextTasks(),
        eval_dataset=TextTasks(n=12, seed=1),
    )  # no compute_metrics given: the ready-made ones, delta_m from args.task_baselines
    metrics = trainer.evaluate()
    explicit = multitask_compute_metrics(model.config.task_specs, baselines)
    assert trainer.compute_metrics.__qualname__ == explicit.__qualname__
    for key in ("eval_topic/accuracy", "eval_topic/f1", "eval_score/mae", "eval_score/rmse"):
        assert key in metrics, metrics
    expected = 50.0 * (
        -(metrics["eval_topic/accuracy"] - 0.5) / 0.5 + (metrics["eval_score/mae"] - 0.2) / 0.2
    )
    assert metrics["eval_delta_m"] == pytest.approx(expected, rel=1e-6)


def _one_scaled_step(tmp_path, scale: float, batch: dict) -> tuple[torch.Tensor, dict]:
    """One mgda training step under a pretended loss scale: (row norms the method saw, .grads)."""
    model = text_model()
    trainer = APTTrainer(
        model=model, args=apt_args(tmp_path, mtl_method="mgda"), train_dataset=TextTasks()
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer._loss_scale = lambda: scale
    seen = []
    original = trainer.mtl_method.aggregate

    def spy(rows, losses):
        seen.append(torch.stack([r.norm() for r in rows]))
        return original(rows, losses)

    trainer.mtl_method.aggregate = spy
    trainer.training_step(model, dict(batch))
    return seen[0], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_scaler_path_aggregates_true_gradients_and_rescales(tmp_path):
    """fp16 bookkeeping without a GPU: with a loss scale S the method must see the unscaled
    per-task gradients, and the .grad it leaves must be S times the unscaled run's (so the
    GradScaler's own unscale / inf check in the optimizer step works)."""
    data = TextTasks()
    batch = APTTrainer(model=text_model(), args=apt_args(tmp_path)).data_collator(
        [data[i] for i in range(4)]
    )
    rows_1, grads_1 = _one_scaled_step(tmp_path, 1.0, batch)
    rows_s, grads_s = _one_scaled_step(tmp_path, 1024.0, batch)
    torch.testing.assert_close(rows_s, rows_1, rtol=1e-4, atol=1e-7)
    for name, grad in grads_1.items():
        torch.testing.assert_close(grads_s[name], grad * 1024.0, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_eval_metrics_equal_the_gathered_ones(tmp_path):
    """multitask_compute_metrics batch by batch (batch_eval_metrics) == on the gathered set."""
    results = []
    for batched in (False, True):
        trainer = APTTrainer(
            model=text_model(),
            args=apt_args(
                tmp_path,
                batch_eval_metrics=batched,
                per_device_eval_batch_size=5,
                task_baselines={"topic/accuracy": 0.5, "score/mae": 0.2},
            ),
            eval_dataset=TextTasks(n=12, seed=1),
        )
        results.append(trainer.evaluate())
    for key in (
        "eval_topic/accuracy",
        "eval_topic/f1",
        "eval_score/mae",
        "eval_score/rmse",
        "eval_delta_m",
    ):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-6), key

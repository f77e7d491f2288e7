"""``APTTrainer``: ``transformers.Trainer`` for multi-task models with MTL methods and APT.

The Trainer keeps the loop (accumulation windows, clipping, scheduler, ``zero_grad``, logging,
checkpoints); this subclass changes what a micro-batch contributes and how the window's
gradient is formed:

* loss-weighting methods (ew, uw, dwa, famo, ...): one backward of the weighted loss per
  micro-batch, DDP's own all-reduce; exactly the stock Trainer for ``ew``;
* gradient methods (pcgrad, mgda, nash_mtl, ...): per micro-batch the per-task gradients of the
  shared parameters (the Jacobian rows) and the heads' gradients are accumulated, forward and
  backward under ``no_sync``; on the window's last micro-batch one flat all-reduce averages them
  across processes, and the method aggregates the *window's* Jacobian once (large-batch
  semantics), identically on every rank (stochastic methods draw from a generator seeded alike).

fp16 with a GradScaler: the losses are scaled before the backward passes (as
``accelerator.backward`` does), the accumulated rows are unscaled before aggregation and the
aggregated gradient is scaled again, so the scaler's own unscale / inf check in the optimizer step
still works. bf16 needs nothing special. A non-finite task loss skips the whole optimizer step
(every ``.grad`` cleared, the optimizer then skips every parameter), warns, and is counted in
``mtl/nonfinite_skipped``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from .config import APTConfig
from .metrics import multitask_compute_metrics
from .mtl import GradientMethod, LossWeighting, get_method, task_jacobian
from .optim import build_optimizer

MTL_STATE_NAME = "mtl_method.pt"


class APTTrainer(Trainer):
    """Trainer for a multi-task model (``apt_hf.MultiTaskModel`` or any model exposing
    ``task_names``, ``head_module_names()``, ``shared_parameters()`` and returning
    ``task_losses``) with the MTL method and APT optimizer of an :class:`APTConfig`.

    Without a ``compute_metrics``, evaluation reports each task type's ready-made metrics
    (``apt_hf.metrics.multitask_compute_metrics``) and ``delta_m`` when
    ``args.task_baselines`` is set."""

    def __init__(
        self, model: nn.Module | None = None, args: APTConfig | None = None, **kwargs: Any
    ) -> None:
        if args is None:
            args = APTConfig(output_dir="apt_trainer_output")
        if not isinstance(args, APTConfig):
            raise TypeError(f"args must be an APTConfig, got {type(args).__name__}")
        for attr in ("task_names", "head_module_names", "shared_parameters"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"APTTrainer needs a multi-task model (e.g. apt_hf.MultiTaskModel): "
                    f"{type(model).__name__} has no {attr!r}"
                )
        specs = getattr(model.config, "task_specs", None)
        if kwargs.get("compute_metrics") is None and specs is not None:
            # default: each task type's ready-made metrics, plus delta_m if baselines are given
            kwargs["compute_metrics"] = multitask_compute_metrics(specs, args.task_baselines)
        super().__init__(model=model, args=args, **kwargs)
        if specs is not None and args.label_names is None:
            self.label_names = [spec.label_column for spec in specs]
        self.task_names: list[str] = list(model.task_names)
        seed = args.seed if args.mtl_seed is None else args.mtl_seed
        self.mtl_method = get_method(
            args.mtl_method,
            len(self.task_names),
            generator=torch.Generator().manual_seed(seed),
            **(args.mtl_method_kwargs or {}),
        ).to(args.device)
        self.nonfinite_skipped = 0
        self._metrics: dict[str, list[Tensor]] = defaultdict(list)
        self._window: dict[str, Any] | None = None
        self._group_lrs: dict[str, float] = {}
        self.add_callback(_EpochEnd(self.mtl_method))

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The APT optimizer of ``args`` (Muon + AdamW, or AdamW) over the model and the MTL
        method's own parameters (UW's log-variances)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = build_optimizer(
                opt_model,
                self.args.apt_optimizer,
                heads=opt_model.head_module_names(),
                extra_params=list(self.mtl_method.parameters()),
                **self.args.optimizer_kwargs(),
            )
        return self.optimizer

    # ------------------------------------------------------------------ one micro-batch
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        steps = self.current_gradient_accumulation_steps
        if self._window is None:  # first micro-batch of a window
            self._window = {"skip": False, "rows": None, "losses": None}
            # the Trainer zeroes the model's grads only: the method's own (UW) are ours
            self.mtl_method.zero_grad(set_to_none=True)
        if isinstance(self.mtl_method, LossWeighting):
            loss = self._loss_weighting_step(model, inputs, steps)
        else:
            loss = self._gradient_method_step(model, inputs, steps)
        if self.accelerator.sync_gradients:
            self._end_window(model)
        return loss

    def _task_losses(self, outputs: Any) -> list[Tensor]:
        """The T task losses in task order (kept apart: a stack would make every per-task
        backward pass traverse all heads)."""
        task_losses = outputs["task_losses"] if isinstance(outputs, dict) else outputs.task_losses
        missing = [t for t in self.task_names if t not in task_losses]
        if missing:
            raise ValueError(
                f"the batch gave no loss for task(s) {missing}: every training batch needs "
                "each task's labels (or set allow_missing_labels on the TaskSpec and use a "
                "loss-weighting method)"
            )
        losses = [task_losses[t].float() for t in self.task_names]
        for task, value in zip(self.task_names, losses, strict=True):
            self._metrics[f"loss/{task}"].append(value.detach())
        return losses

    def _all_finite(self, losses: list[Tensor]) -> bool:
        finite = torch.isfinite(torch.stack(losses).detach()).all().float()
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, "min")
        return bool(finite.item())

    def _forward(self, model: nn.Module, inputs: dict[str, Any]) -> list[Tensor] | None:
        """The task losses of one micro-batch, or None (window marked skipped) if any is not
        finite on any rank."""
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses = self._task_losses(outputs)
        if self._all_finite(losses):
            return losses
        self._window["skip"] = True
        return None

    def _loss_weighting_step(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> Tensor:
        losses = self._forward(model, inputs)
        if losses is None:
            # every rank still runs a backward (of zero) so DDP's reduction completes
            zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            self.accelerator.backward(zero)
            return torch.zeros((), device=self.args.device)
        loss = self.mtl_method.combine(torch.stack(losses)) / steps
        self.accelerator.backward(loss)
        return loss.detach()

    def _shared_and_heads(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """Trainable shared parameters (the MTL method's input) and every other trainable one."""
        unwrapped = self.accelerator.unwrap_model(model)
        shared = [p for _, p in unwrapped.shared_parameters() if p.requires_grad]
        if not shared:
            raise ValueError("the model leaves no trainable shared parameter for the MTL method")
        shared_ids = {id(p) for p in shared}
        heads = [p for p in unwrapped.parameters() if p.requires_grad and id(p) not in shared_ids]
        return shared, heads

    def _gradient_method_step(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> Tensor:
        shared, heads = self._shared_and_heads(model)
        window = self._window
        with self.accelerator.no_sync(model):
            losses = self._forward(model, inputs)
            if losses is None:
                return torch.zeros((), device=self.args.device)
            factor = self._loss_scale() / steps
            rows = task_jacobian(
                losses if factor == 1.0 else [loss * factor for loss in losses],
                shared + heads,
                strategy=self.args.jacobian_strategy,
            )
        with torch.no_grad():
            # per shared tensor its (T, *shape) rows; per head tensor the sum over tasks
            parts = rows[: len(shared)] + [row.sum(0) for row in rows[len(shared) :]]
            values = torch.stack(losses).detach()
            if window["rows"] is None:
                window["rows"], window["losses"] = parts, values / steps
            else:
                torch._foreach_add_(window["rows"], parts)
                window["losses"] += values / steps
        return values.sum() / steps

    def _loss_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _end_window(self, model: nn.Module) -> None:
        """Last micro-batch of the window: reduce, aggregate, or skip the whole step."""
        window, self._window = self._window, None
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        # the lr each group steps with now (logged like Trainer's learning_rate, pre-scheduler)
        self._group_lrs = {
            g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(optimizer.param_groups)
        }
        distributed = self.accelerator.num_processes > 1
        if isinstance(self.mtl_method, GradientMethod):
            self._aggregate_window(model, window, distributed)
        elif distributed and not window["skip"]:
            for p in self.mtl_method.parameters():  # outside DDP: average by hand
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, "mean")
        if window["skip"]:
            self.nonfinite_skipped += 1
            warnings.warn(
                f"non-finite task loss at step {self.state.global_step}: optimizer step skipped "
                f"({self.nonfinite_skipped} so far); parameters and optimizer state untouched",
                RuntimeWarning,
                stacklevel=3,
            )
            model.zero_grad(set_to_none=True)
            self.mtl_method.zero_grad(set_to_none=True)

    def _aggregate_window(
        self, model: nn.Module, window: dict[str, Any], distributed: bool
    ) -> None:
        shared, heads = self._shared_and_heads(model)
        n_tasks = len(self.task_names)
        parts, losses = window["rows"], window["losses"]
        if distributed:  # one flat all-reduce: rows, head grads, losses and the skip flag
            shapes = [(n_tasks, *p.shape) for p in shared] + [p.shape for p in heads]
            if parts is None:
                parts = [torch.zeros(shape, device=self.args.device) for shape in shapes]
                losses = torch.zeros(n_tasks, device=self.args.device)
            skip = torch.tensor([float(window["skip"])], device=self.args.device)
            flat = torch.cat([x.reshape(-1).float() for x in parts] + [losses, skip])
            flat = self.accelerator.reduce(flat, "sum") / self.accelerator.num_processes
            window["skip"] = window["skip"] or bool(flat[-1] > 0)
            sizes = [math.prod(shape) for shape in shapes]
            parts = [
                x.view(shape)
                for x, shape in zip(torch.split(flat[: sum(sizes)], sizes), shapes, strict=True)
            ]
            losses = flat[sum(sizes) : -1]
        if window["skip"] or parts is None:
            window["skip"] = True
            return
        scale = self._loss_scale()
        rows = parts[: len(shared)]
        if scale != 1.0:  # fp16: aggregate the true gradients, hand the scaler scaled ones
            rows = [row / scale for row in rows]
        with torch.no_grad():
            aggregated = self.mtl_method.aggregate(rows, losses)
            for p, grad in zip(shared, aggregated, strict=True):
                p.grad = (grad * scale if scale != 1.0 else grad).to(p.dtype)
            for p, grad in zip(heads, parts[len(shared) :], strict=True):
                p.grad = grad.to(p.dtype)
        if self.mtl_method.last_weights is not None:
            for task, w in zip(self.task_names, self.mtl_method.last_weights, strict=True):
                self._metrics[f"weight/{task}"].append(w.float())

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            for key, values in self._metrics.items():
                value = torch.stack(values).mean().to(self.args.device)
                if self.accelerator.num_processes > 1:
                    value = self.accelerator.reduce(value, "mean")
                logs[key] = round(float(value), 6)
            self._metrics.clear()
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            if hasattr(optimizer, "diagnostics"):
                logs.update({f"apt/{k}": v for k, v in optimizer.diagnostics().items()})
            logs.update({f"lr/{name}": lr for name, lr in self._group_lrs.items()})
            logs["mtl/nonfinite_skipped"] = self.nonfinite_skipped
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """Per-task logits and labels as dicts keyed by task name (``compute_metrics`` gets
        ``EvalPrediction(predictions={task: ...}, label_ids={task: ...})``)."""
        inputs = self._prepare_inputs(inputs)
        specs = self.accelerator.unwrap_model(model).config.task_specs
        labels = {s.name: inputs[s.label_column] for s in specs if s.label_column in inputs}
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        loss = outputs.loss.detach().mean() if outputs.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        logits = {task: value.detach() for task, value in outputs.logits.items()}
        return loss, logits, (labels or None)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(
                {
                    "method": self.mtl_method.method_state(),
                    "nonfinite_skipped": self.nonfinite_skipped,
                },
                os.path.join(output_dir, MTL_STATE_NAME),
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, MTL_STATE_NAME)
        if os.path.isfile(path):
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.mtl_method.load_method_state(state["method"])
            self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))

    # ------------------------------------------------------------------ model card
    def create_model_card(
        self, model_name: str | None = None, tags: Any = None, **kwargs: Any
    ) -> None:
        """README.md for the Hub: backbone, tasks, MTL method, optimizer and APT settings, the
        latest per-task eval metrics; tagged ``apt-hf`` and ``multi-task-learning``."""
        self._write_card(self.args.output_dir, model_name=model_name, tags=tags)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model; a save you ask for (not a checkpoint) also writes the model card."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self._write_card(output_dir or self.args.output_dir)

    def _write_card(self, directory: str, model_name: str | None = None, tags: Any = None) -> None:
        if not self.is_world_process_zero():
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(self, model_name=model_name, extra_tags=tags))


class _EpochEnd(TrainerCallback):
    """Tells the MTL method an epoch ended (DWA rolls its loss history then)."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.method.epoch_end()


def model_card(trainer: APTTrainer, model_name: str | None = None, extra_tags: Any = None) -> str:
    """The model card text (YAML front matter + markdown) for ``trainer``'s model and run."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.config
    backbone = getattr(config, "backbone_config", None)
    backbone_name = getattr(backbone, "_name_or_path", "") or getattr(backbone, "model_type", "?")
    tags = ["apt-hf", "multi-task-learning"]
    if isinstance(extra_tags, str):
        extra_tags = [extra_tags]
    tags += [t for t in (extra_tags or []) if t not in tags]
    name = model_name or os.path.basename(os.path.abspath(args.output_dir))
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if backbone_name and "/" in str(backbone_name):
        lines.append(f"base_model: {backbone_name}")
    lines += [
        "---",
        "",
        f"# {name}",
        "",
        "Multi-task model trained with [apt-hf](https://pypi.org/project/apt-hf/).",
        "",
        f"- **Backbone:** {backbone_name} ({getattr(backbone, 'model_type', '?')})",
        f"- **MTL method:** `{args.mtl_method}` {args.mtl_method_kwargs or ''}".rstrip(),
        f"- **Optimizer:** `{args.apt_optimizer}` (AdamW lr {args.learning_rate}, weight "
        f"decay {args.weight_decay}"
        + (
            f"; Muon lr {args.muon_lr}, momentum {args.muon_momentum}, ns_steps "
            f"{args.muon_ns_steps}, adjust_lr {args.muon_adjust_lr})"
            if args.apt_optimizer == "muon"
            else ")"
        ),
        f"- **APT:** {'on' if args.apt else 'off'}"
        + (
            f" (beta_min {args.apt_beta_min if args.apt_beta_min is not None else 0.8}, "
            f"beta_max {args.apt_beta_max if args.apt_beta_max is not None else 'base'}, "
            f"map {args.apt_beta_map}, granularity {args.apt_granularity}, direction "
            f"preservation {args.apt_direction_preservation} (gamma {args.apt_dp_gamma}), "
            f"scope {args.apt_scope})"
            if args.apt
            else ""
        ),
        "",
        "## Tasks",
        "",
        "| task | type | labels | loss | weight |",
        "|---|---|---|---|---|",
    ]
    for spec in getattr(config, "task_specs", []):
        lines.append(
            f"| {spec.name} | {spec.type} | {spec.num_labels} | {spec.loss} | {spec.weight} |"
        )
    evals = [
        entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)
    ]
    lines += ["", "## Evaluation", ""]
    if evals:
        latest = evals[-1]
        lines += [f"Step {latest.get('step', '?')}:", "", "| metric | value |", "|---|---|"]
        for key, value in sorted(latest.items()):
            if key.startswith("eval_") and isinstance(value, int | float) and math.isfinite(value):
                lines.append(f"| {key[5:]} | {value:.4g} |")
    else:
        lines.append("No evaluation was run.")
    return "\n".join(lines) + "\n"

"""MultiTaskModel: one transformers backbone shared by one head per task.

The forward returns every task's logits, every labelled task's (unweighted) loss and their
weighted sum, so per-task gradients (``apt_hf.mtl``) and plain training both start from one
forward pass. Shared parameters are the backbone's, task parameters live under ``heads.<task>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration import DENSE_TASKS, SEQUENCE_TASKS, MultiTaskConfig, TaskSpec, as_task_specs
from .heads import build_head, task_loss


@dataclass
class MultiTaskOutput(ModelOutput):
    """``loss``: sum_k weight_k * L_k over the tasks with labels (None without labels);
    ``task_losses``: the unweighted L_k by task name; ``logits``: every head's output."""

    loss: Tensor | None = None
    task_losses: dict[str, Tensor] | None = None
    logits: dict[str, Tensor] | None = None


def _pooled_size(config: PreTrainedConfig) -> int | None:
    """Width of the backbone's pooled vector: last stage width (conv nets) or hidden size."""
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    hidden = getattr(config, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _token_size(config: PreTrainedConfig) -> int | None:
    """Width of the backbone's token sequence; None for conv nets (their output is a map)."""
    if getattr(config, "hidden_sizes", None):
        return None
    hidden = getattr(config, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _feature_channels(config: PreTrainedConfig, main_input_name: str) -> list[int] | None:
    """Channels of the feature maps the dense heads read, None for non-image backbones.

    Conv nets (ResNet / RegNet / ConvNeXt): ``hidden_states`` = stem output + one map per stage.
    Swin: ``reshaped_hidden_states`` = patch embeddings + each stage's (downsampled) output.
    ViT-like: the last hidden state's patch tokens as one grid.
    """
    if main_input_name != "pixel_values":
        return None
    if getattr(config, "hidden_sizes", None):
        stem = getattr(config, "embedding_size", None) or config.hidden_sizes[0]
        return [int(stem), *map(int, config.hidden_sizes)]
    if getattr(config, "embed_dim", None) and getattr(config, "depths", None):
        dim, n = int(config.embed_dim), len(config.depths)
        return [dim] + [dim * 2 ** min(i + 1, n - 1) for i in range(n)]
    hidden = getattr(config, "hidden_size", None)
    if getattr(config, "patch_size", None) and isinstance(hidden, int):
        return [hidden]
    return None


class MultiTaskModel(PreTrainedModel):
    """A backbone (any ``AutoModel``) and one head per :class:`TaskSpec` in ``config.tasks``.

    Heads: linear / MLP on the pooled vector (classification, multilabel, regression), on each
    token (token_classification), or a light decoder on the feature maps (segmentation, depth,
    normals). Labels come as ``labels={task: tensor}`` or as keyword columns named by each
    spec's ``label_column``.
    """

    config_class = MultiTaskConfig
    config: MultiTaskConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    # Attention lives in the backbone, which checks the requested implementation itself.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Label columns arrive as **kwargs: Trainer must not add num_items_in_batch to them.
    accepts_loss_kwargs = False

    def __init__(self, config: MultiTaskConfig, backbone: PreTrainedModel | None = None) -> None:
        if not isinstance(config, MultiTaskConfig):
            raise TypeError(f"config: expected a MultiTaskConfig, got {type(config).__name__}")
        if config.backbone_config is None:
            raise ValueError(
                "MultiTaskConfig.backbone_config is None: set it to the backbone's config, or "
                "build the model with MultiTaskModel.from_backbone(name_or_path, tasks)"
            )
        specs = config.task_specs
        if not specs:
            raise ValueError("MultiTaskConfig.tasks is empty: a MultiTaskModel needs >= 1 task")
        super().__init__(config)
        if backbone is None:
            backbone = AutoModel.from_config(config.backbone_config)
        elif backbone.config is not config.backbone_config:
            raise ValueError(
                "backbone: its config must be config.backbone_config (build the config with "
                "MultiTaskConfig(backbone_config=backbone.config, ...))"
            )
        self.backbone = backbone
        self.main_input_name = backbone.main_input_name
        self.task_specs: list[TaskSpec] = specs
        self._is_text = backbone.main_input_name == "input_ids"
        channels = _feature_channels(config.backbone_config, backbone.main_input_name)
        self._dense = any(s.type in DENSE_TASKS for s in specs)
        self._pooled = any(s.type in SEQUENCE_TASKS for s in specs)
        # Conv nets and Swin give their maps only with output_hidden_states; ViT-like backbones
        # give patch tokens in last_hidden_state.
        self._needs_hidden_states = self._dense and (channels is not None and len(channels) > 1)
        self.heads = nn.ModuleDict(
            {
                s.name: build_head(
                    s,
                    pooled_size=_pooled_size(config.backbone_config),
                    token_size=_token_size(config.backbone_config),
                    feature_channels=channels,
                    hidden_size=config.head_hidden_size,
                    dropout=config.head_dropout,
                    decoder_channels=config.dense_decoder_channels,
                )
                for s in specs
            }
        )
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        tasks: Sequence[TaskSpec | Mapping[str, Any]],
        *,
        backbone_kwargs: Mapping[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> MultiTaskModel:
        """A model around the pretrained backbone ``name_or_path`` (hub id or local directory,
        loaded with ``AutoModel.from_pretrained(name_or_path, **backbone_kwargs)``) with newly
        initialised heads. ``config_kwargs`` go to :class:`MultiTaskConfig`. Returned in eval
        mode, like ``from_pretrained``."""
        specs = as_task_specs(list(tasks))
        backbone = AutoModel.from_pretrained(name_or_path, **dict(backbone_kwargs or {}))
        loaded = backbone.config
        attn, experts = loaded._attn_implementation, loaded._experts_implementation
        config = MultiTaskConfig(
            backbone_config=loaded, tasks=[s.to_dict() for s in specs], **config_kwargs
        )
        # A new config sets its (unset) attention / experts implementation on its sub-configs:
        # restore what loading the backbone chose.
        config._attn_implementation, config._experts_implementation = attn, experts
        model = cls(config, backbone=backbone)
        model.heads.to(backbone.dtype)
        return model.eval()

    def _init_weights(self, module: nn.Module) -> None:
        """Heads: normal(0, initializer_range) weights, zero biases. The backbone's modules are
        initialised by the backbone's own ``_init_weights``."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs: Any) -> None:
        """Checkpoint the backbone's layers; the heads are small and never checkpointed."""
        if not self.backbone.supports_gradient_checkpointing:
            if enable:
                raise ValueError(
                    f"gradient checkpointing: the backbone {type(self.backbone).__name__} does "
                    "not support it"
                )
            return
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

    # ----- tasks and parameters -----

    @property
    def task_names(self) -> list[str]:
        """Task names, in head order."""
        return [s.name for s in self.task_specs]

    @property
    def label_columns(self) -> list[str]:
        """Batch keys holding each task's labels (what Trainer's ``label_names`` should be)."""
        return [s.label_column for s in self.task_specs]

    def head_module_names(self) -> list[str]:
        """Dotted names of the heads, e.g. ``["heads.sst2", ...]`` (for ``split_parameters``)."""
        return [f"heads.{name}" for name in self.task_names]

    def shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters outside the heads (the backbone's)."""
        return [
            (n, p)
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("heads.")
        ]

    def task_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters of each task's head, by task name."""
        return {
            name: [
                (f"heads.{name}.{n}", p)
                for n, p in self.heads[name].named_parameters()
                if p.requires_grad
            ]
            for name in self.task_names
        }

    def check_shared(self) -> list[tuple[str, nn.Parameter]]:
        """The shared parameters; ValueError when there is none (backbone fully frozen)."""
        shared = self.shared_parameters()
        if not shared:
            raise ValueError(
                f"MultiTaskModel: the backbone {type(self.backbone).__name__} has no trainable "
                "parameter (all frozen), which leaves no shared parameter for per-task gradients "
                "and MTL methods; unfreeze at least part of the backbone"
            )
        return shared

    # ----- forward -----

    def _collect_labels(
        self, labels: Mapping[str, Tensor] | None, columns: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """Labels by task name, from ``labels={task: tensor}`` and from label-column kwargs."""
        by_column = {s.label_column: s.name for s in self.task_specs}
        unknown = sorted(set(columns) - set(by_column))
        if unknown:
            raise TypeError(
                f"MultiTaskModel.forward() got unexpected keyword argument(s) {unknown}; the "
                f"label columns of this model are {sorted(by_column)}"
            )
        found: dict[str, Tensor] = {}
        if labels is not None:
            if not isinstance(labels, Mapping):
                raise TypeError(
                    "labels: expected a dict {task name: tensor} (or one keyword per label "
                    f"column: {sorted(by_column)}), got {type(labels).__name__}"
                )
            unknown = sorted(set(labels) - set(self.task_names))
            if unknown:
                raise ValueError(f"labels: unknown task(s) {unknown}; tasks: {self.task_names}")
            found.update({name: value for name, value in labels.items() if value is not None})
        for column, value in columns.items():
            if value is None:
                continue
            name = by_column[column]
            if name in found:
                raise ValueError(
                    f"task {name!r}: labels given twice, as labels[{name!r}] and as {column!r}"
                )
            found[name] = value
        if found:  # training / evaluation batch: every task needs labels unless it may skip
            for spec in self.task_specs:
                if spec.name not in found and not spec.allow_missing_labels:
                    raise ValueError(
                        f"task {spec.name!r}: the batch has labels for {sorted(found)} but none "
                        f"for this task (expected the column {spec.label_column!r} or "
                        f"labels[{spec.name!r}]); set allow_missing_labels=True in its TaskSpec "
                        "to skip it in such batches"
                    )
        return found

    def _pool(self, outputs: ModelOutput, attention_mask: Tensor | None) -> Tensor:
        """Sequence-level features (B, D) for the classification / regression heads."""
        pooling = self.config.pooling
        pooler = getattr(outputs, "pooler_output", None)
        if pooling in ("auto", "pooler") and pooler is not None:
            return pooler.flatten(1)
        backbone = type(self.backbone).__name__
        if pooling == "pooler":
            raise ValueError(
                f"pooling='pooler': {backbone} returns no pooler_output; use 'cls' or 'mean'"
            )
        hidden = outputs.last_hidden_state
        if hidden.ndim == 4:  # feature map (B, C, H, W)
            if pooling == "cls":
                raise ValueError(f"pooling='cls': {backbone} outputs feature maps, not tokens")
            return hidden.mean(dim=(2, 3))
        if pooling == "cls" or (pooling == "auto" and self._is_text):
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def _feature_maps(self, outputs: ModelOutput, pixel_values: Tensor | None) -> list[Tensor]:
        """Multi-scale maps (B, C_i, H_i, W_i) for the dense heads."""
        if pixel_values is None:
            raise ValueError("dense tasks (segmentation / depth / normals) need pixel_values")
        reshaped = getattr(outputs, "reshaped_hidden_states", None)
        if reshaped is not None:
            return list(reshaped)
        hidden_states = getattr(outputs, "hidden_states", None)
        if hidden_states is not None and hidden_states[-1].ndim == 4:
            return list(hidden_states)
        tokens = outputs.last_hidden_state  # ViT-like: (B, prefix + patches, D)
        patch = self.config.backbone_config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        gh, gw = pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw
        prefix = tokens.shape[1] - gh * gw
        if prefix < 0:
            raise ValueError(
                f"{type(self.backbone).__name__}: {tokens.shape[1]} tokens for a {gh}x{gw} patch "
                f"grid (image {tuple(pixel_values.shape[-2:])}, patch {patch})"
            )
        grid = tokens[:, prefix:].transpose(1, 2)  # drop CLS / distillation / register tokens
        return [grid.reshape(tokens.shape[0], tokens.shape[-1], gh, gw)]

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Mapping[str, Tensor] | None = None,
        return_dict: bool | None = None,
        **label_columns: Tensor,
    ) -> MultiTaskOutput | tuple:
        """Run the backbone once and every head; the loss of each task with labels.

        Without any labels (inference) no loss is computed. With labels for some tasks, every
        other task must have ``allow_missing_labels``. Dense logits are upsampled to the label's
        (H, W), or to the image's without labels.
        """
        task_labels = self._collect_labels(labels, label_columns)
        inputs = {
            k: v
            for k, v in (
                ("input_ids", input_ids),
                ("attention_mask", attention_mask),
                ("token_type_ids", token_type_ids),
                ("pixel_values", pixel_values),
            )
            if v is not None
        }
        if input_ids is None and pixel_values is None:
            raise ValueError(
                f"MultiTaskModel.forward: pass input_ids or pixel_values (this backbone's main "
                f"input is {self.main_input_name!r})"
            )
        if self._needs_hidden_states:
            inputs["output_hidden_states"] = True
        outputs = self.backbone(**inputs, return_dict=True)

        pooled = self._pool(outputs, attention_mask) if self._pooled else None
        maps = self._feature_maps(outputs, pixel_values) if self._dense else None
        logits: dict[str, Tensor] = {}
        task_losses: dict[str, Tensor] = {}
        for spec in self.task_specs:
            head = self.heads[spec.name]
            label = task_labels.get(spec.name)
            if spec.type in DENSE_TASKS:
                use_label = isinstance(label, Tensor) and label.ndim >= 3
                size = tuple((label if use_label else pixel_values).shape[-2:])
                logits[spec.name] = head(maps, size)
            elif spec.type == "token_classification":
                logits[spec.name] = head(outputs.last_hidden_state)
            else:
                logits[spec.name] = head(pooled)
            if label is not None:
                task_losses[spec.name] = task_loss(spec, logits[spec.name], label)
        return self._output(task_losses, logits, return_dict)

    def _output(
        self, task_losses: dict[str, Tensor], logits: dict[str, Tensor], return_dict: bool | None
    ) -> MultiTaskOutput | tuple:
        """The output every multi-task forward ends with: ``loss`` = sum_k weight_k L_k over
        the tasks that had labels (None without), the per-task losses and logits."""
        loss = None
        if task_losses:
            weights = {s.name: s.weight for s in self.task_specs}
            loss = torch.stack([weights[n] * value for n, value in task_losses.items()]).sum()
        output = MultiTaskOutput(loss=loss, task_losses=task_losses, logits=logits)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

"""Which parameters go to Muon and which to AdamW, and one optimizer object for both parts.

The standard split for Muon: >= 2-D weights of the shared backbone's linear / conv layers go to
Muon; embeddings, the first conv / patch embedding, norms, biases and task heads go to AdamW.
Decay / no-decay follows ``transformers.Trainer.get_decay_parameter_names`` (no decay for
LayerNorm modules and for names matching bias / layernorm / rmsnorm / norm patterns); the rule
is re-stated here because this module must not import transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .apt import APTAdamW, APTMuon

OPTIMIZERS = ("adamw", "muon")
APT_SCOPES = ("shared", "all")
_NO_DECAY_PATTERNS = [
    re.compile(p)
    for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]
_MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MATRIX_LAYER_NAMES = ("Conv1D",)  # transformers.pytorch_utils.Conv1D (GPT-2), matched by name


@dataclass
class ParameterSplit:
    """Parameter names of each part. ``muon``: shared hidden matrices; ``adamw_decay`` /
    ``adamw_no_decay``: the rest of the shared parameters; ``head_decay`` / ``head_no_decay``:
    task-specific parameters."""

    muon: list[str] = field(default_factory=list)
    adamw_decay: list[str] = field(default_factory=list)
    adamw_no_decay: list[str] = field(default_factory=list)
    head_decay: list[str] = field(default_factory=list)
    head_no_decay: list[str] = field(default_factory=list)

    @property
    def shared(self) -> list[str]:
        return self.muon + self.adamw_decay + self.adamw_no_decay

    @property
    def heads(self) -> list[str]:
        return self.head_decay + self.head_no_decay


def no_decay_names(model: nn.Module) -> set[str]:
    """Names ``transformers.Trainer`` would exclude from weight decay."""
    out: set[str] = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, nn.LayerNorm) or any(
                pat.search(full.lower()) for pat in _NO_DECAY_PATTERNS
            ):
                out.add(full)
    return out


def _head_prefixes(model: nn.Module, heads: Iterable[str | nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    prefixes = []
    for head in heads:
        if isinstance(head, nn.Module):
            if id(head) not in names:
                raise ValueError(f"heads: module {type(head).__name__} is not part of the model")
            prefixes.append(names[id(head)])
        elif isinstance(head, str):
            if head not in params and not any(n.startswith(head + ".") for n in params):
                raise ValueError(f"heads: {head!r} names no parameter or submodule of the model")
            prefixes.append(head)
        else:
            raise TypeError(f"heads: expected module names or modules, got {type(head).__name__}")
    return prefixes


def split_parameters(
    model: nn.Module, heads: Iterable[str | nn.Module] = (), *, first_conv_to_adamw: bool = True
) -> ParameterSplit:
    """Split the trainable parameters of ``model`` for a Muon run (see the module docstring).

    ``heads``: task-specific submodules (objects or dotted names) or parameter names.
    Muon takes a parameter when it is the ``weight`` (>= 2-D) of a Linear / Conv / Conv1D layer
    outside the heads, not under a module whose name contains "embed", and not the model's first
    conv (the stem / patch embedding; ``first_conv_to_adamw``).
    """
    prefixes = _head_prefixes(model, heads)
    no_decay = no_decay_names(model)
    first_conv = None
    if first_conv_to_adamw:
        first_conv = next(
            (
                n
                for n, m in model.named_modules()
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            ),
            None,
        )
    muon_names = set()
    for module_name, module in model.named_modules():
        is_matrix_layer = isinstance(module, _MATRIX_LAYERS) or type(module).__name__ in (
            _MATRIX_LAYER_NAMES
        )
        if not is_matrix_layer or module_name == first_conv or "embed" in module_name.lower():
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.ndim >= 2:
            muon_names.add(f"{module_name}.weight" if module_name else "weight")

    split = ParameterSplit()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(name == pre or name.startswith(pre + ".") for pre in prefixes)
        if is_head:
            (split.head_no_decay if name in no_decay else split.head_decay).append(name)
        elif name in muon_names:
            split.muon.append(name)
        else:
            (split.adamw_no_decay if name in no_decay else split.adamw_decay).append(name)
    return split


def build_optimizer(
    model: nn.Module,
    optimizer: str = "muon",
    *,
    heads: Iterable[str | nn.Module] = (),
    lr: float | None = None,
    weight_decay: float | None = None,
    adamw_lr: float = 3e-4,
    adamw_weight_decay: float = 1e-2,
    apt_scope: str = "shared",
    extra_params: Iterable[nn.Parameter] = (),
    **kwargs: Any,
) -> APTMuon | APTAdamW:
    """One optimizer for the whole model, named groups, APT on the shared parameters.

    ``optimizer="muon"``: an :class:`APTMuon` with groups ``muon`` (shared matrices, ``lr``,
    ``weight_decay``), ``adamw_decay`` / ``adamw_no_decay`` (rest of the shared parameters,
    ``adamw_lr``), ``heads_decay`` / ``heads_no_decay``. ``optimizer="adamw"``: an
    :class:`APTAdamW` with the same groups minus ``muon`` (``lr`` then defaults to ``adamw_lr``).
    ``apt_scope="shared"`` keeps the fixed beta on the heads; ``"all"`` applies APT to them too.
    ``extra_params`` (e.g. an MTL method's learnable loss weights) join as group ``extra``
    (AdamW, no decay, no APT). Remaining ``kwargs`` go to the optimizer class (APT options,
    betas, momentum, ...). Empty groups are left out.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} is not allowed: choose one of {list(OPTIMIZERS)}"
        )
    if apt_scope not in APT_SCOPES:
        raise ValueError(
            f"apt_scope={apt_scope!r} is not allowed: choose one of {list(APT_SCOPES)}"
        )
    split = split_parameters(model, heads)
    params = dict(model.named_parameters())
    apt = kwargs.get("apt", True)
    head_apt = apt and apt_scope == "all"

    # AdamW-only runs: ``lr`` / ``weight_decay`` are the AdamW ones.
    decay = adamw_weight_decay if optimizer == "muon" or weight_decay is None else weight_decay

    def group(name: str, names: list[str], **extra: Any) -> dict[str, Any]:
        return {"name": name, "params": [params[n] for n in names], "algorithm": "adamw", **extra}

    # AdamW-only runs: the shared matrices join the AdamW decay group.
    shared_decay = split.adamw_decay if optimizer == "muon" else split.muon + split.adamw_decay
    groups = [
        group("adamw_decay", shared_decay, weight_decay=decay),
        group("adamw_no_decay", split.adamw_no_decay, weight_decay=0.0),
        group("heads_decay", split.head_decay, weight_decay=decay, apt=head_apt),
        group("heads_no_decay", split.head_no_decay, weight_decay=0.0, apt=head_apt),
        {
            "name": "extra",
            "params": list(extra_params),
            "algorithm": "adamw",
            "weight_decay": 0.0,
            "apt": False,
        },
    ]
    if optimizer == "muon":
        muon = {"name": "muon", "params": [params[n] for n in split.muon], "algorithm": "muon"}
        if weight_decay is not None:
            muon["weight_decay"] = weight_decay
        groups = [muon, *groups]
        muon_kwargs = {"adamw_lr": adamw_lr, "adamw_weight_decay": adamw_weight_decay, **kwargs}
        if lr is not None:
            muon_kwargs["lr"] = lr
        return APTMuon([g for g in groups if g["params"]], **muon_kwargs)
    adamw_kwargs = {"lr": adamw_lr if lr is None else lr, **kwargs}
    return APTAdamW([g for g in groups if g["params"]], **adamw_kwargs)

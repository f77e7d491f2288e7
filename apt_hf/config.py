"""``APTConfig``: ``TrainingArguments`` plus every option of the MTL method, the optimizer and APT.

Each option is one dataclass field with ``metadata={"help": ...}`` (and ``choices`` where the set
is closed), validated in ``__post_init__``, usable from ``HfArgumentParser`` (CLI and YAML). The
README's "APTConfig options" table is checked against these fields by a test. The AdamW part of
the optimizer reads the inherited ``learning_rate``, ``weight_decay``, ``adam_beta1``,
``adam_beta2`` and ``adam_epsilon``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from .mtl import METHODS
from .mtl.jacobian import STRATEGIES
from .optim import ADJUST_LR, BETA_MAPS, DIRECTION_PRESERVATION, GRANULARITIES
from .optim.functional import NS_DTYPES
from .optim.param_groups import APT_SCOPES, OPTIMIZERS

#: The fields APTConfig adds to TrainingArguments, in declaration order (README table order).
APT_FIELDS: tuple[str, ...] = ()


@dataclass
class APTConfig(TrainingArguments):
    """Training arguments for :class:`~apt_hf.APTTrainer` (see the module docstring)."""

    _VALID_DICT_FIELDS = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "mtl_method_kwargs",
        "task_baselines",
    ]

    mtl_method: str = field(
        default="ew",
        metadata={"help": "MTL method (apt_hf.mtl.METHODS).", "choices": sorted(METHODS)},
    )
    mtl_method_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Options of the MTL method, as a dict or a JSON string."},
    )
    mtl_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the stochastic MTL methods' generator (default: seed)."},
    )
    jacobian_strategy: str = field(
        default="auto",
        metadata={"help": "How per-task gradients are computed.", "choices": list(STRATEGIES)},
    )
    apt_optimizer: str = field(
        default="muon",
        metadata={
            "help": "muon: Muon for the shared hidden matrices + AdamW for the rest; adamw: "
            "AdamW for everything.",
            "choices": list(OPTIMIZERS),
        },
    )
    muon_lr: float = field(default=0.02, metadata={"help": "Learning rate of the Muon group."})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon momentum (EMA)."})
    muon_nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum in Muon."})
    muon_ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations."})
    muon_weight_decay: float = field(
        default=0.0, metadata={"help": "Decoupled weight decay of the Muon group."}
    )
    muon_adjust_lr: str = field(
        default="original",
        metadata={"help": "Muon lr adjustment on the flattened shape.", "choices": list(ADJUST_LR)},
    )
    muon_ns_dtype: str = field(
        default="bfloat16",
        metadata={"help": "Newton-Schulz precision.", "choices": list(NS_DTYPES)},
    )
    apt: bool = field(default=True, metadata={"help": "APT's adaptive momentum on or off."})
    apt_beta_min: float | None = field(
        default=None,
        metadata={"help": "Lowest momentum (default 0.8, from docs/algorithm.md's ablation)."},
    )
    apt_beta_max: float | None = field(
        default=None,
        metadata={"help": "Highest momentum (default: the base momentum, beta1 / Muon's)."},
    )
    apt_beta_map: str = field(
        default="linear",
        metadata={"help": "Cosine-to-beta map.", "choices": list(BETA_MAPS)},
    )
    apt_granularity: str = field(
        default="tensor",
        metadata={
            "help": "One cosine per tensor or per param group.",
            "choices": list(GRANULARITIES),
        },
    )
    apt_direction_preservation: str = field(
        default="instant",
        metadata={
            "help": "Direction preservation before Newton-Schulz (Muon).",
            "choices": list(DIRECTION_PRESERVATION),
        },
    )
    apt_dp_gamma: float = field(
        default=0.5, metadata={"help": "Weight of the instant direction in DP 'instant'."}
    )
    apt_scope: str = field(
        default="shared",
        metadata={
            "help": "Where APT applies: the shared parameters, or also the heads.",
            "choices": list(APT_SCOPES),
        },
    )
    task_baselines: dict | str | None = field(
        default=None,
        metadata={
            "help": "Single-task baselines {'<task>/<metric>': value} for Delta_m, as a "
            "dict or a JSON string."
        },
    )

    def __post_init__(self) -> None:
        for name in ("mtl_method_kwargs", "task_baselines"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name}={value!r} is not valid JSON: {err}") from err
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict or a JSON object, got {value!r}")
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        for f in fields(self):
            if f.name not in APT_FIELDS:
                continue
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not allowed: choose one of {choices}")
        _in("muon_lr", self.muon_lr, 0.0, math.inf)
        _in("muon_momentum", self.muon_momentum, 0.0, 1.0, high_open=True)
        _in("muon_weight_decay", self.muon_weight_decay, 0.0, math.inf)
        _in("apt_dp_gamma", self.apt_dp_gamma, 0.0, math.inf)
        if not isinstance(self.muon_ns_steps, int) or not 1 <= self.muon_ns_steps < 100:
            raise ValueError(f"muon_ns_steps={self.muon_ns_steps!r} is out of range: [1, 100)")
        if self.apt_beta_max is not None:
            _in("apt_beta_max", self.apt_beta_max, 0.0, 1.0, high_open=True)
        if self.apt_beta_min is not None:
            high = self.apt_beta_max if self.apt_beta_max is not None else 1.0
            _in("apt_beta_min", self.apt_beta_min, 0.0, high, high_open=self.apt_beta_max is None)
        if self.mtl_seed is not None and not isinstance(self.mtl_seed, int):
            raise ValueError(f"mtl_seed={self.mtl_seed!r} must be an int")

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`apt_hf.optim.build_optimizer` for these settings."""
        kwargs: dict[str, Any] = {
            "adamw_lr": self.learning_rate,
            "adamw_weight_decay": self.weight_decay,
            "apt_scope": self.apt_scope,
            "apt": self.apt,
            "beta_map": self.apt_beta_map,
            "granularity": self.apt_granularity,
            "update_cos_every": max(1, int(self.logging_steps)) if self.apt else 0,
        }
        adamw_betas = (self.adam_beta1, self.adam_beta2)
        if self.apt_optimizer == "muon":
            kwargs.update(
                lr=self.muon_lr,
                weight_decay=self.muon_weight_decay,
                momentum=self.muon_momentum,
                nesterov=self.muon_nesterov,
                ns_steps=self.muon_ns_steps,
                adjust_lr=self.muon_adjust_lr,
                ns_dtype=self.muon_ns_dtype,
                direction_preservation=self.apt_direction_preservation,
                dp_gamma=self.apt_dp_gamma,
                adamw_betas=adamw_betas,
                adamw_eps=self.adam_epsilon,
                adamw_beta_min=self.apt_beta_min,
                beta_min=self.apt_beta_min,
                beta_max=self.apt_beta_max,
            )
        else:
            kwargs.update(
                lr=self.learning_rate,
                weight_decay=self.weight_decay,
                betas=adamw_betas,
                eps=self.adam_epsilon,
                beta_min=self.apt_beta_min,
                beta_max=self.apt_beta_max,
            )
        return kwargs


def _in(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    ok = (
        isinstance(value, int | float)
        and low <= value
        and (value < high if high_open else value <= high)
    )
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range: allowed [{low}, {high}{bracket}")


APT_FIELDS = tuple(
    f.name for f in fields(APTConfig) if f.name not in {g.name for g in fields(TrainingArguments)}
)


def options_table() -> str:
    """The README's APTConfig options table (markdown), generated from the fields."""
    rows = ["| option | default | choices | help |", "|---|---|---|---|"]
    by_name = {f.name: f for f in fields(APTConfig)}
    for name in APT_FIELDS:
        f = by_name[name]
        choices = ", ".join(f"`{c}`" for c in f.metadata.get("choices", []))
        rows.append(f"| `{name}` | `{f.default!r}` | {choices} | {f.metadata['help']} |")
    return "\n".join(rows)

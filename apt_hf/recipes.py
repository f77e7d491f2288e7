"""Shared plumbing of the ``recipes/``: argument parsing (YAML config + CLI overrides) and the
train / evaluate / report step every recipe ends with."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .config import APTConfig
from .trainer import APTTrainer

RESULTS_NAME = "results.json"


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None
) -> tuple[Any, ...]:
    """Parse ``(APTConfig, *dataclass_types)``: ``--config FILE.yaml`` gives defaults, every other
    ``--key value`` overrides them. Returns the instances, APTConfig first. An unknown key in the
    YAML file raises ValueError naming it and the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((APTConfig, *dataclass_types))
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path}: expected a mapping of option: value")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown option(s) {unknown}")
        parser.set_defaults(**{k: _cli_value(v) for k, v in values.items()})
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def _cli_value(value: Any) -> Any:
    """YAML values as argparse would have read them (dicts become JSON strings)."""
    return json.dumps(value) if isinstance(value, dict) else value


def run_recipe(
    name: str,
    model: Any,
    args: APTConfig,
    train_dataset: Any,
    eval_dataset: Any,
    *,
    data_collator: Callable | None = None,
    compute_metrics: Callable | None = None,
) -> dict[str, float]:
    """Train, evaluate, print a per-task table (and Delta_m% when ``args.task_baselines`` is
    set), save the model and ``results.json`` to ``args.output_dir``; return the eval metrics."""
    trainer = APTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(format_metrics(name, metrics), flush=True)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_NAME).write_text(
            json.dumps(
                {
                    "recipe": name,
                    "metrics": metrics,
                    "last_evals_mean": last_evals_mean(trainer.state.log_history),
                    "log_history": trainer.state.log_history,
                    "config": {
                        "mtl_method": args.mtl_method,
                        "apt_optimizer": args.apt_optimizer,
                        "apt": args.apt,
                        "seed": args.seed,
                    },
                },
                indent=2,
                default=str,
            )
        )
    return metrics


def last_evals_mean(log_history: list[dict], k: int = 10) -> dict[str, float]:
    """Mean of each eval metric over the last ``k`` evaluations during training (the MTAN
    protocol reports the mean of the last 10 epochs); empty without evaluations."""
    evals = [e for e in log_history if any(key.startswith("eval_") for key in e)][-k:]
    keys = {
        key
        for e in evals
        for key, v in e.items()
        if key.startswith("eval_") and isinstance(v, int | float)
    }
    return {
        key: sum(e[key] for e in evals if key in e) / sum(key in e for e in evals)
        for key in sorted(keys)
    }


def format_metrics(name: str, metrics: dict[str, float]) -> str:
    """A small text table: one row per ``eval_<task>/<metric>``, then Delta_m%."""
    rows = [f"{name}: evaluation"]
    for key, value in sorted(metrics.items()):
        if key.startswith("eval_") and "/" in key and isinstance(value, int | float):
            rows.append(f"  {key[5:]:<32} {value:.4f}")
    if "eval_delta_m" in metrics and math.isfinite(metrics["eval_delta_m"]):
        rows.append(f"  {'Delta_m%':<32} {metrics['eval_delta_m']:+.2f}")
    return "\n".join(rows)

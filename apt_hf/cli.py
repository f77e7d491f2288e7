"""The ``apt-hf`` command: ``train`` a recipe, list the ``methods``, ``compare`` combinations.

apt-hf train multidigits [--config FILE] [--key value ...]
apt-hf methods
apt-hf compare multidigits --methods ew,pcgrad --optimizers adamw,muon --apt off,on --seeds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .mtl import METHODS
from .optim.param_groups import OPTIMIZERS
from .recipes import RESULTS_NAME

APT_CHOICES = {"off": "false", "on": "true"}


def recipes_dir() -> Path:
    """``$APT_HF_RECIPES``, else ``./recipes``, else the checkout's ``recipes/``."""
    candidates = [Path(os.environ["APT_HF_RECIPES"])] if "APT_HF_RECIPES" in os.environ else []
    candidates += [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"no recipes directory: looked in {[str(p) for p in candidates]}; set APT_HF_RECIPES"
    )


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.py") if not p.stem.startswith("_"))


def load_recipe(name: str) -> ModuleType:
    path = recipes_dir() / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown recipe {name!r}: choose one of {available_recipes()}")
    module_name = f"apt_hf_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _default_config(name: str, argv: list[str]) -> list[str]:
    """Use ``recipes/configs/<name>.yaml`` unless ``--config`` is given."""
    config = recipes_dir() / "configs" / f"{name}.yaml"
    if "--config" in argv or not config.is_file():
        return argv
    return ["--config", str(config), *argv]


def cmd_train(name: str, argv: list[str]) -> dict[str, float] | None:
    """Run a recipe; with several GPUs and no launcher around us, re-run under accelerate."""
    argv = _default_config(name, argv)
    recipe = load_recipe(name)
    import torch

    if torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        launcher = shutil.which("accelerate")
        if launcher is None:
            raise RuntimeError("several GPUs found but no `accelerate` executable on PATH")
        config = recipes_dir() / "accelerate_configs" / "multi_gpu.yaml"
        cmd = [
            launcher,
            "launch",
            "--config_file",
            str(config),
            "--num_processes",
            str(torch.cuda.device_count()),
            recipe.__file__,
            *argv,
        ]
        subprocess.run(cmd, check=True)
        return None
    return recipe.main(argv)


def cmd_methods() -> str:
    rows = [f"{'name':<12} {'kind':<9} {'extra':<8} paper"]
    for name, cls in METHODS.items():
        rows.append(f"{name:<12} {cls.kind:<9} {cls.extra or '-':<8} {cls.paper}")
    return "\n".join(rows)


def _split(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise ValueError(f"--{what} {value!r}: {bad or 'empty'} not in {sorted(allowed)}")
    return items


def cmd_compare(name: str, opts: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Train every (method, optimizer, apt, seed) combination; write the comparison."""
    methods = _split(opts.methods, list(METHODS), "methods")
    optimizers = _split(opts.optimizers, list(OPTIMIZERS), "optimizers")
    apts = _split(opts.apt, list(APT_CHOICES), "apt")
    if opts.seeds < 1:
        raise ValueError(f"--seeds {opts.seeds}: must be >= 1")
    out = Path(opts.output_dir or f"outputs/compare_{name}")
    out.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(methods, optimizers, apts))
    total, done, start = len(combos) * opts.seeds, 0, time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for method, optimizer, apt in combos:
        label = f"{method}/{optimizer}/apt-{apt}"
        for seed in range(opts.seeds):
            run_dir = out / "runs" / label.replace("/", "_") / f"seed{seed}"
            argv = [
                *overrides,
                "--mtl_method",
                method,
                "--apt_optimizer",
                optimizer,
                "--apt",
                APT_CHOICES[apt],
                "--seed",
                str(seed),
                "--output_dir",
                str(run_dir),
                "--disable_tqdm",
                "true",
            ]
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done) if done else float("nan")
            print(
                f"[{done + 1}/{total}] {label} seed {seed}  (elapsed {elapsed:.0f}s, "
                f"eta {eta:.0f}s)",
                flush=True,
            )
            cmd_train(name, argv)
            runs.setdefault(label, []).append(json.loads((run_dir / RESULTS_NAME).read_text()))
            done += 1
    summary = summarize(runs)
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    (out / "comparison.md").write_text(markdown_table(name, summary))
    plot(summary, runs, out)
    print(markdown_table(name, summary))
    print(f"wrote {out / 'comparison.md'}, comparison.json, metrics.png, curves.png")
    return summary


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean and std over seeds of every per-task metric and Delta_m% per combination."""
    summary: dict[str, Any] = {}
    for label, results in runs.items():
        keys = sorted(
            {
                k
                for r in results
                for k, v in r["metrics"].items()
                if k.startswith("eval_")
                and ("/" in k or k == "eval_delta_m")
                and isinstance(v, int | float)
            }
        )
        stats = {}
        for key in keys:
            values = [r["metrics"][key] for r in results if key in r["metrics"]]
            stats[key[5:]] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        summary[label] = stats
    return summary


def markdown_table(name: str, summary: dict[str, Any]) -> str:
    metrics = sorted({m for stats in summary.values() for m in stats})
    lines = [
        f"# {name}: comparison (mean +- std over seeds)",
        "",
        "| method / optimizer / APT | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for label, stats in summary.items():
        cells = [
            f"{stats[m]['mean']:.4f} +- {stats[m]['std']:.4f}" if m in stats else "-"
            for m in metrics
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "delta_m is Delta_m% against the recipe's single-task baselines (lower is better)."
    )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], runs: dict[str, list[dict]], out: Path) -> None:
    """metrics.png: one panel per metric, a bar per combination (error bar: std over seeds);
    curves.png: training loss against step, mean over seeds, one line per combination."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError('apt-hf compare draws plots: pip install "apt-hf[plots]"') from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    metrics = sorted({m for stats in summary.values() for m in stats})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = [summary[lb].get(metric, {}).get("mean", float("nan")) for lb in labels]
        stds = [summary[lb].get(metric, {}).get("std", 0.0) for lb in labels]
        ax.bar(
            range(len(labels)),
            means,
            yerr=stds,
            color=[f"C{i}" for i in range(len(labels))],
            capsize=3,
        )
        ax.set_title(metric)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        finite = [m for m in means if m == m]
        if finite and metric != "delta_m":
            low, high = min(finite), max(finite)
            ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, label in enumerate(labels):
        curves = [
            [(e["step"], e["loss"]) for e in r["log_history"] if "loss" in e] for r in runs[label]
        ]
        steps = sorted({s for c in curves for s, _ in c})
        mean = [statistics.mean(dict(c)[s] for c in curves if s in dict(c)) for s in steps]
        ax.plot(steps, mean, label=label, color=f"C{i}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Parse and run one command; return what it produced (metrics or the comparison)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="apt-hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="run a recipe (extra --key value and --help pass through)", add_help=False
    )
    train.add_argument("recipe")
    sub.add_parser("methods", help="list the MTL methods")
    compare = sub.add_parser("compare", help="train and compare combinations")
    compare.add_argument("recipe")
    compare.add_argument("--methods", default="ew,pcgrad")
    compare.add_argument("--optimizers", default="adamw,muon")
    compare.add_argument("--apt", default="off,on")
    compare.add_argument("--seeds", type=int, default=3)
    compare.add_argument("--output-dir", default=None)
    opts, rest = parser.parse_known_args(argv)
    if opts.command == "methods":
        if rest:
            parser.error(f"unexpected arguments: {rest}")
        print(cmd_methods())
    elif opts.command == "train":
        return cmd_train(opts.recipe, rest)
    else:
        return cmd_compare(opts.recipe, opts, _default_config(opts.recipe, rest))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: exit status 0 on success (errors raise)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

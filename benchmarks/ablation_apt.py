"""APT ablation on MultiDigits: which beta_min and which direction preservation to default to.

Trains ``examples/plain_pytorch.py``'s two-task ConvNet for every combination of optimizer,
beta_min (the base momentum itself = APT off) and, for Muon, direction preservation, with the
MTL methods given, over several seeds; prints mean test accuracy (both tasks) +- std and writes
JSON. The defaults in ``apt_hf.optim.apt`` come from this table (see docs/algorithm.md).

    python benchmarks/ablation_apt.py --seeds 3 --epochs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location(
        "plain_pytorch", ROOT / "examples" / "plain_pytorch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description="APT ablation on MultiDigits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", default="ew,pcgrad")
    parser.add_argument("--beta-min", default="0.3,0.5,0.7")
    parser.add_argument("--out", default="benchmarks/results/ablation_apt.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    example = _example()
    beta_mins = [float(b) for b in args.beta_min.split(",")]
    configs: list[dict] = []
    for method in args.methods.split(","):
        for beta_min in [None, *beta_mins]:  # None: APT off (plain AdamW / Muon)
            configs.append(
                {"method": method, "optimizer": "adamw", "beta_min": beta_min, "dp": None}
            )
            for dp in ("none", "row", "instant"):
                if beta_min is None and dp != "none":
                    continue
                configs.append(
                    {"method": method, "optimizer": "muon", "beta_min": beta_min, "dp": dp}
                )
    rows = []
    start = time.perf_counter()
    for i, cfg in enumerate(configs):
        accs = []
        for seed in range(args.seeds):
            options = {"apt": cfg["beta_min"] is not None}
            if cfg["beta_min"] is not None:
                options["beta_min"] = cfg["beta_min"]
                if cfg["optimizer"] == "muon":
                    options["adamw_beta_min"] = cfg["beta_min"]
                    options["direction_preservation"] = cfg["dp"]
            acc, _ = example.train(
                cfg["method"], cfg["optimizer"], epochs=args.epochs, seed=seed, log=False, **options
            )
            accs.append(acc["mean"])
        row = {
            **cfg,
            "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
        }
        rows.append(row)
        print(
            f"[{i + 1}/{len(configs)} {time.perf_counter() - start:.0f}s] {_fmt(row)}", flush=True
        )
    print("\nmethod  optimizer  beta_min  dp        mean acc (both tasks) +- std")
    for row in rows:
        print(_fmt(row))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "rows": rows}, indent=2))
    print(f"wrote {out}")


def _fmt(row: dict) -> str:
    beta = "off" if row["beta_min"] is None else f"{row['beta_min']:.2f}"
    return (
        f"{row['method']:<7} {row['optimizer']:<9} {beta:<8}  {str(row['dp']):<8}  "
        f"{100 * row['acc_mean']:.2f} +- {100 * row['acc_std']:.2f}"
    )


if __name__ == "__main__":
    main()

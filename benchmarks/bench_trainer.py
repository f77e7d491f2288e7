"""Trainer benchmark: APTTrainer against the stock Trainer, ratios measured side by side.

    python benchmarks/bench_trainer.py [--repeats 3] [--steps 12]

Every configuration trains a BERT-like encoder (hidden 256, 4 layers, ~5 M parameters) with T
classification heads for ``--steps`` optimizer steps in its own subprocess (so its peak RSS is
its own); configurations alternate, ``--repeats`` rounds; the time per step is the median over
steps after the first two, then the median over rounds. Ratios:

    APTTrainer(ew, AdamW, APT off) / stock Trainer        target <= 1.03
    APTTrainer(ew, AdamW, APT on)  / APT off              target <= 1.05
    APTTrainer(pcgrad, T) / stock Trainer (T = 2, 4)      reported
    APTTrainer(pcgrad, T) / the same step in a plain loop  target <= 1.05: the Trainer adds
        (forward + apt_hf.mtl.backward + optimizer.step, i.e. bench_core's per-task gradients)
        no more than 5% to the per-task-gradient step

Results: printed table and benchmarks/results/bench_trainer.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "stock_T2": {"trainer": "stock", "tasks": 2},
    "ew_off_T2": {"trainer": "apt", "tasks": 2, "mtl_method": "ew", "apt": False},
    "ew_on_T2": {"trainer": "apt", "tasks": 2, "mtl_method": "ew", "apt": True},
    "pcgrad_T2": {"trainer": "apt", "tasks": 2, "mtl_method": "pcgrad", "apt": False},
    "loop_pcgrad_T2": {"trainer": "loop", "tasks": 2, "mtl_method": "pcgrad", "apt": False},
    "stock_T4": {"trainer": "stock", "tasks": 4},
    "pcgrad_T4": {"trainer": "apt", "tasks": 4, "mtl_method": "pcgrad", "apt": False},
    "loop_pcgrad_T4": {"trainer": "loop", "tasks": 4, "mtl_method": "pcgrad", "apt": False},
}


def worker(name: str, steps: int) -> dict:
    """Train one configuration; return per-step seconds and the peak RSS."""
    import torch
    from torch.utils.data import Dataset
    from transformers import BertConfig, Trainer, TrainerCallback, TrainingArguments

    from apt_hf import APTConfig, APTTrainer, MultiTaskModel, TaskSpec
    from apt_hf.modeling import MultiTaskConfig

    cfg = CONFIGS[name]
    n_tasks = cfg["tasks"]
    torch.manual_seed(0)

    class Data(Dataset):
        def __init__(self) -> None:
            gen = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 8000, (512, 64), generator=gen)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            item = {"input_ids": self.ids[i], "attention_mask": torch.ones(64, dtype=torch.long)}
            for k in range(n_tasks):
                item[f"labels_t{k}"] = self.ids[i, k + 1] % 3
            return item

    backbone = BertConfig(
        vocab_size=8000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
    )
    tasks = [TaskSpec(name=f"t{k}", type="classification", num_labels=3) for k in range(n_tasks)]
    model = MultiTaskModel(
        MultiTaskConfig(backbone_config=backbone, tasks=[t.to_dict() for t in tasks])
    )
    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench_trainer_{name}_"),
        "max_steps": steps,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-4,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 10_000,
        "seed": 0,
    }
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    if cfg["trainer"] == "loop":
        return _plain_loop(model, Data(), cfg, steps)
    if cfg["trainer"] == "stock":
        trainer = Trainer(
            model=model,
            train_dataset=Data(),
            callbacks=[Timer()],
            args=TrainingArguments(
                optim="adamw_torch", **common, label_names=[f"labels_t{k}" for k in range(n_tasks)]
            ),
        )
    else:
        trainer = APTTrainer(
            model=model,
            train_dataset=Data(),
            callbacks=[Timer()],
            args=APTConfig(
                mtl_method=cfg["mtl_method"], apt_optimizer="adamw", apt=cfg["apt"], **common
            ),
        )
    trainer.train()
    return {
        "step_s": statistics.median(times[2:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _plain_loop(model, data, cfg: dict, steps: int) -> dict:
    """The same training step written by hand: forward, apt_hf.mtl.backward, optimizer step."""
    import torch

    from apt_hf import build_optimizer, get_method
    from apt_hf.mtl import backward

    loader = torch.utils.data.DataLoader(
        data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    method = get_method(cfg["mtl_method"], n_tasks=cfg["tasks"])
    opt = build_optimizer(model, "adamw", heads=model.head_module_names(), lr=1e-4, apt=cfg["apt"])
    shared = [p for _, p in model.shared_parameters()]
    times = []
    for i, batch in enumerate(loader):
        if i == steps:
            break
        start = time.perf_counter()
        out = model(**batch)
        backward(out.task_losses, shared, method)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times[2:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="APTTrainer vs stock Trainer (ratios)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/bench_trainer.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.repeats):
        for name in CONFIGS:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    step = {n: statistics.median(x["step_s"] for x in v) for n, v in runs.items()}
    peak = {n: max(x["peak_rss_mb"] for x in v) for n, v in runs.items()}
    ratios = {
        "ew_apt_off_vs_stock": (step["ew_off_T2"] / step["stock_T2"], "<= 1.03"),
        "ew_apt_on_vs_off": (step["ew_on_T2"] / step["ew_off_T2"], "<= 1.05"),
        "pcgrad_T2_vs_stock": (step["pcgrad_T2"] / step["stock_T2"], "reported"),
        "pcgrad_T4_vs_stock": (step["pcgrad_T4"] / step["stock_T4"], "reported"),
        "pcgrad_T2_vs_plain_loop": (step["pcgrad_T2"] / step["loop_pcgrad_T2"], "<= 1.05"),
        "pcgrad_T4_vs_plain_loop": (step["pcgrad_T4"] / step["loop_pcgrad_T4"], "<= 1.05"),
    }
    print(f"\n{'ratio':<24} {'value':>7}  target")
    for key, (value, target) in ratios.items():
        print(f"{key:<24} {value:>7.3f}  {target}")
    print(f"\n{'config':<12} {'step ms':>8} {'peak RSS MB':>12}")
    for name in CONFIGS:
        print(f"{name:<12} {1e3 * step[name]:>8.1f} {peak[name]:>12.0f}")
    out = ROOT / args.out
    out.write_text(
        json.dumps(
            {
                "step_s": step,
                "peak_rss_mb": peak,
                "runs": runs,
                "ratios": {k: v[0] for k, v in ratios.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

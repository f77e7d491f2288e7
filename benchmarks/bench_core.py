"""Core benchmark: ratios measured side by side in one run (median of repeats, interleaved).

(a) APTAdamW step / torch.optim.AdamW step               (target <= 1.10)
(b) APTMuon step / torch.optim.Muon step, same 2-D weights (target <= 1.05)
(c) apt-hf per-task gradients / the fastest of a LibMTL-style loop (backward(retain_graph=True)
    + .grad copies) and torchjd's mtl_backward, BERT-like encoder, T = 2, 4, 8  (target <= 1.0)

    python benchmarks/bench_core.py [--repeats 15] [--out benchmarks/results/bench_core.json]

Timings on a shared 2-core machine are noisy: each ratio compares candidates measured in
alternation within one run; never use these numbers as timed assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchjd
from torch import nn
from transformers import BertConfig, BertModel

from apt_hf.mtl import task_jacobian
from apt_hf.optim import APTAdamW, APTMuon


def interleaved(
    candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each candidate; each repeat runs every candidate once, in an
    order shuffled per repeat (seeded), so drift and cache effects hit all of them alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn = candidates[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def encoder(hidden: int = 256, layers: int = 4) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=8000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
    )
    return BertModel(cfg, add_pooling_layer=False)


def _with_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def bench_adamw(repeats: int) -> dict[str, float]:
    model = encoder()
    params = _with_grads([p for p in model.parameters()])
    apt = APTAdamW(params, lr=1e-6, beta_min=0.5)
    ref = torch.optim.AdamW(params, lr=1e-6)
    t = interleaved({"apt": apt.step, "torch": ref.step}, repeats)
    return {
        "apt_ms": t["apt"] * 1e3,
        "torch_ms": t["torch"] * 1e3,
        "ratio": t["apt"] / t["torch"],
        "target": 1.10,
    }


def bench_muon(repeats: int) -> dict[str, float]:
    model = encoder()
    params = _with_grads(
        [p for n, p in model.named_parameters() if p.ndim == 2 and "embeddings" not in n]
    )
    apt = APTMuon(params, lr=1e-6, beta_min=0.5)  # default DP, bf16 NS as torch
    ref = torch.optim.Muon(params, lr=1e-6, weight_decay=0.0)
    t = interleaved({"apt": apt.step, "torch": ref.step}, max(3, repeats // 3))
    return {
        "apt_ms": t["apt"] * 1e3,
        "torch_ms": t["torch"] * 1e3,
        "ratio": t["apt"] / t["torch"],
        "target": 1.05,
        "tensors": len(params),
    }


class MultiHead(nn.Module):
    def __init__(self, n_tasks: int, hidden: int = 256) -> None:
        super().__init__()
        self.encoder = encoder(hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, 3) for _ in range(n_tasks))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.encoder(input_ids=ids).last_hidden_state[:, 0]
        return features, [head(features).square().mean() for head in self.heads]


def bench_jacobian(n_tasks: int, repeats: int, batch: int = 16, seq: int = 64) -> dict[str, float]:
    model = MultiHead(n_tasks)
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    ids = torch.randint(0, 8000, (batch, seq), generator=torch.Generator().manual_seed(0))
    n_shared = sum(p.numel() for p in shared)

    def libmtl_loop() -> None:
        model.zero_grad(set_to_none=True)
        _, losses = model(ids)
        grads = torch.zeros(n_tasks, n_shared)
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=k < n_tasks - 1)
            offset = 0
            for p in shared:
                if p.grad is not None:
                    grads[k, offset : offset + p.numel()] = p.grad.reshape(-1)
                    p.grad = None
                offset += p.numel()

    def torchjd_mtl_backward() -> None:
        model.zero_grad(set_to_none=True)
        for p in shared:
            p.__dict__.pop("jac", None)
        features, losses = model(ids)
        torchjd.autojac.mtl_backward(
            losses,
            features=features,
            shared_params=shared,
            tasks_params=[list(h.parameters()) for h in model.heads],
        )

    def ours() -> None:
        model.zero_grad(set_to_none=True)
        _, losses = model(ids)
        task_jacobian(losses, shared + heads)  # rows for the heads too, as apt_hf.mtl.backward

    t = interleaved(
        {"ours": ours, "libmtl_loop": libmtl_loop, "torchjd": torchjd_mtl_backward}, repeats
    )
    best = min(t["libmtl_loop"], t["torchjd"])
    return {
        "T": n_tasks,
        "params_M": round(n_shared / 1e6 + sum(p.numel() for p in heads) / 1e6, 2),
        "ours_ms": t["ours"] * 1e3,
        "libmtl_loop_ms": t["libmtl_loop"] * 1e3,
        "torchjd_ms": t["torchjd"] * 1e3,
        "ratio": t["ours"] / best,
        "target": 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="apt-hf core benchmark (ratios)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tasks", default="2,4,8")
    parser.add_argument("--out", default="benchmarks/results/bench_core.json")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "adamw": bench_adamw(args.repeats),
        "muon": bench_muon(args.repeats),
        "jacobian": [bench_jacobian(int(t), args.repeats) for t in args.tasks.split(",")],
    }
    rows = [
        ("(a) APTAdamW / torch AdamW step", results["adamw"]),
        ("(b) APTMuon / torch Muon step", results["muon"]),
    ]
    rows += [(f"(c) per-task grads / best baseline, T={r['T']}", r) for r in results["jacobian"]]
    print(f"{'benchmark':<44} {'ratio':>7} {'target':>7}  details")
    for name, r in rows:
        details = ", ".join(
            f"{k}={v:.1f}" for k, v in r.items() if k.endswith("_ms") and isinstance(v, float)
        )
        print(f"{name:<44} {r['ratio']:>7.3f} {'<= ' + str(r['target']):>7}  {details}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

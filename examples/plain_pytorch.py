"""Two-task training in a plain PyTorch loop with ``apt_hf.mtl.backward`` and APT-Muon.

MultiDigits (offline, scikit-learn's digits in MultiMNIST's layout): one shared ConvNet, a left-
digit head and a right-digit head. Runs in well under a minute on 2 CPU cores::

    python examples/plain_pytorch.py                      # PCGrad + APT-Muon
    python examples/plain_pytorch.py --method ew --optimizer adamw --no-apt
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

import apt_hf
from apt_hf.data import make_multidigits
from apt_hf.mtl import backward, get_method

TASKS = ("left", "right")


class TwoDigitNet(nn.Module):
    """Shared ConvNet backbone and one linear head per task."""

    def __init__(self, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 100, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, 10) for task in TASKS})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        return {task: head(features) for task, head in self.heads.items()}


def train(
    method: str = "pcgrad",
    optimizer: str = "muon",
    *,
    epochs: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    log: bool = True,
    **apt_options: object,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Train; return the test accuracy per task (and their mean) and the mean training loss of
    each task per epoch."""
    torch.manual_seed(seed)
    train_set, test_set = make_multidigits("train", seed=0), make_multidigits("test", seed=0)
    model = TwoDigitNet()
    mtl = get_method(method, n_tasks=len(TASKS), generator=torch.Generator().manual_seed(seed))
    opt = apt_hf.build_optimizer(
        model,
        optimizer,
        heads=[model.heads],
        lr=0.02 if optimizer == "muon" else 1e-3,
        adamw_lr=1e-3,
        extra_params=list(mtl.parameters()),
        **apt_options,
    )
    n = len(train_set["image"])
    gen = torch.Generator().manual_seed(seed)
    shared = list(model.backbone.parameters())
    history = []
    for epoch in range(epochs):
        totals = dict.fromkeys(TASKS, 0.0)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            logits = model(train_set["image"][idx])
            losses = {t: F.cross_entropy(logits[t], train_set[t][idx]) for t in TASKS}
            opt.zero_grad()
            backward(losses, shared, mtl)
            opt.step()
            for t in TASKS:
                totals[t] += losses[t].item() * len(idx)
        mtl.epoch_end()
        history.append({t: totals[t] / n for t in TASKS})
        if log:
            msg = "  ".join(f"loss/{t} {totals[t] / n:.4f}" for t in TASKS)
            print(f"epoch {epoch + 1}: {msg}  {_format_diag(opt.diagnostics())}", flush=True)
    with torch.no_grad():
        logits = model(test_set["image"])
    acc = {t: (logits[t].argmax(-1) == test_set[t]).float().mean().item() for t in TASKS}
    acc["mean"] = sum(acc[t] for t in TASKS) / len(TASKS)
    return acc, history


def _format_diag(diag: dict[str, float]) -> str:
    return "  ".join(f"apt/{k} {v:.3f}" for k, v in diag.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pcgrad", help="MTL method (apt_hf.mtl.METHODS)")
    parser.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    parser.add_argument("--no-apt", action="store_true", help="plain Muon / AdamW")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    acc = train(
        args.method, args.optimizer, epochs=args.epochs, seed=args.seed, apt=not args.no_apt
    )
    print("test accuracy: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

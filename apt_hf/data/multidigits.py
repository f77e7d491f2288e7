"""MultiDigits: MultiMNIST's layout (Sener & Koltun, 2018) on scikit-learn's bundled 8x8 digits.

Two tasks on one 10x10 canvas: the left digit at [0:8, 0:8] and a partner shifted down-right at
[2:10, 2:10], overlapping pixels combined by max. The source digits are split into train / test
pools *before* pairing, so no test digit image is ever seen in training. Offline: the digits ship
inside scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "test")
CANVAS = 10
DIGIT = 8
SHIFT = 2


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError(
            'MultiDigits needs scikit-learn (it ships the 8x8 digits): pip install "apt-hf[dev]" '
            "or pip install scikit-learn"
        ) from err
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.long)


def make_multidigits(
    split: str = "train",
    n_pairs: int | None = None,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Build one split: ``{"image": (N, 1, 10, 10) float in [0, 1], "left": (N,), "right": (N,)}``.

    ``n_pairs`` defaults to 4x the split's pool of source digits. ``seed`` fixes both the
    pool split (shared by train and test, so they never overlap) and the pairing.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed: choose one of {list(SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is out of range: allowed (0, 1)")
    images, labels = _load_digits()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(images) * test_fraction))
    pool = order[:n_test] if split == "test" else order[n_test:]
    if n_pairs is None:
        n_pairs = 4 * len(pool)
    if n_pairs < 1:
        raise ValueError(f"n_pairs={n_pairs!r} must be >= 1")
    gen = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    left = pool[torch.randint(len(pool), (n_pairs,), generator=gen)]
    right = pool[torch.randint(len(pool), (n_pairs,), generator=gen)]
    canvas = torch.zeros(n_pairs, 1, CANVAS, CANVAS)
    canvas[:, 0, :DIGIT, :DIGIT] = images[left]
    canvas[:, 0, SHIFT:, SHIFT:] = torch.maximum(canvas[:, 0, SHIFT:, SHIFT:], images[right])
    return {"image": canvas, "left": labels[left], "right": labels[right]}


@dataclass
class MultiDigits(Dataset):
    """Map-style dataset over :func:`make_multidigits`; items are dicts of tensors."""

    split: str = "train"
    n_pairs: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.data = make_multidigits(self.split, self.n_pairs, seed=self.seed)

    def __len__(self) -> int:
        return len(self.data["image"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.data.items()}

"""The plain-PyTorch example trains: per-task losses fall and both digits are learnt."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "plain_pytorch", ROOT / "examples" / "plain_pytorch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("method", "optimizer"), [("pcgrad", "muon"), ("uw", "adamw")])
def test_example_losses_fall_and_digits_are_learnt(example, method, optimizer):
    acc, history = example.train(method, optimizer, epochs=2, log=False)
    for task in example.TASKS:
        assert history[-1][task] < 0.5 * history[0][task], (task, history)
        assert acc[task] > 0.6, acc  # chance is 0.1

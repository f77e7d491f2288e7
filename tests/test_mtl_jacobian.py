"""Per-task Jacobian rows: every strategy equals the per-task autograd reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from apt_hf.mtl import combine, flatten_rows, gramian, task_jacobian, unflatten
from apt_hf.mtl import jacobian as jacobian_module

STRATEGIES = ["loop", "batched", "autojac", "auto"]


def _model_and_losses() -> tuple[list[Tensor], list[Tensor], list[nn.Linear], Tensor]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    unused = nn.Parameter(torch.randn(3))
    heads = [nn.Linear(8, 1) for _ in range(3)]
    features = backbone(torch.randn(5, 4))
    targets = torch.randn(3, 5)
    losses = [
        ((head(features).squeeze(-1) - t) ** 2).mean()
        for head, t in zip(heads, targets, strict=True)
    ]
    shared = [*backbone.parameters(), unused]
    return losses, shared, heads, unused


def _reference(losses: list[Tensor], shared: list[Tensor]) -> list[Tensor]:
    per_task = [
        torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True) for loss in losses
    ]
    return [
        torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per_task])
        for i, p in enumerate(shared)
    ]


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_per_task_autograd(strategy: str, as_tensor: bool) -> None:
    losses, shared, _, _ = _model_and_losses()
    expected = _reference(losses, shared)
    inputs = torch.stack(losses) if as_tensor else losses
    rows = task_jacobian(inputs, shared, strategy=strategy)
    assert len(rows) == len(shared)  # heads are not included
    for row, ref, p in zip(rows, expected, shared, strict=True):
        assert row.shape == (3, *p.shape)
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-6)


def test_unused_parameter_gives_zero_rows() -> None:
    losses, shared, _, unused = _model_and_losses()
    rows = task_jacobian(losses, shared, strategy="loop")
    assert torch.equal(rows[-1], torch.zeros(3, *unused.shape))


def test_retain_graph_allows_a_second_call() -> None:
    losses, shared, _, _ = _model_and_losses()
    first = task_jacobian(losses, shared, strategy="loop", retain_graph=True)
    second = task_jacobian(losses, shared, strategy="batched")
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


class _NotVmappable(torch.autograd.Function):
    """Identity whose backward calls .item(), which vmap cannot batch."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return grad * (1.0 + 0.0 * grad.sum().item())


def test_batched_falls_back_to_loop_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jacobian_module, "_batched_failed", False)
    weight = nn.Parameter(torch.randn(3))
    y = _NotVmappable.apply(weight * 2.0)
    losses = [y[0] ** 2, y[1] * y[2]]
    expected = _reference(losses, [weight])
    with pytest.warns(RuntimeWarning, match="loop"):
        rows = task_jacobian(losses, [weight], strategy="batched", retain_graph=True)
    torch.testing.assert_close(rows[0], expected[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task_jacobian(losses, [weight], strategy="batched")  # warned once only
    assert jacobian_module._batched_failed


def test_invalid_strategy_and_empty_losses() -> None:
    losses, shared, _, _ = _model_and_losses()
    with pytest.raises(ValueError, match="strategy"):
        task_jacobian(losses, shared, strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        task_jacobian([], shared)


def test_gramian_combine_flatten_unflatten() -> None:
    torch.manual_seed(0)
    rows = [torch.randn(3, 4, 5), torch.randn(3, 7)]
    matrix = flatten_rows(rows)
    assert matrix.shape == (3, 27)
    torch.testing.assert_close(gramian(rows), matrix @ matrix.T)
    weights = torch.tensor([0.5, -1.0, 2.0])
    combined = combine(rows, weights)
    expected = unflatten(weights @ matrix, [row[0] for row in rows])
    for a, b in zip(combined, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="elements"):
        unflatten(torch.zeros(5), [row[0] for row in rows])


def test_gramian_is_float32_for_half_rows() -> None:
    rows = [torch.randn(2, 6).to(torch.bfloat16)]
    assert gramian(rows).dtype == torch.float32
    assert gramian([torch.randn(2, 6, dtype=torch.float64)]).dtype == torch.float64

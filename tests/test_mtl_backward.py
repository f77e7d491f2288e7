"""``backward``: .grad contents for loss weightings and gradient methods, validation."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from apt_hf.mtl import METHODS, backward, get_method, task_jacobian

# torchjd's Nash-MTL cvxpy problem is not DPP; cvxpy says so once per problem.
pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem")


class _CountBackward(torch.autograd.Function):
    """Identity that counts how often the backward passes through it."""

    calls = 0

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        _CountBackward.calls += 1
        return grad


class _Net(nn.Module):
    def __init__(self, n_tasks: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(n_tasks))
        self.unused = nn.Parameter(torch.zeros(2))

    def losses(self, seed: int = 0) -> list[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 4, generator=generator)
        y = torch.randn(len(self.heads), 6, generator=generator)
        features = _CountBackward.apply(self.backbone(x))
        return [
            ((head(features).squeeze(-1) - target) ** 2).mean()
            for head, target in zip(self.heads, y, strict=True)
        ]

    def shared(self) -> list[Tensor]:
        return [*self.backbone.parameters(), self.unused]


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net()


def _grads(net: nn.Module) -> dict[str, Tensor | None]:
    return {name: p.grad for name, p in net.named_parameters()}


def test_ew_equals_backward_of_the_sum() -> None:
    net = _net()
    sum(net.losses()).backward()
    expected = _grads(net)
    net.zero_grad(set_to_none=True)
    weights = backward(net.losses(), net.shared(), "ew")
    assert torch.equal(weights, torch.ones(3))
    for name, grad in _grads(net).items():
        if expected[name] is None:
            assert grad is None, name
        else:
            assert torch.equal(grad, expected[name]), name


def test_ew_weights_give_the_weighted_sum_gradient() -> None:
    net = _net()
    w = [0.5, 2.0, -1.0]
    sum(wk * loss for wk, loss in zip(w, net.losses(), strict=True)).backward()
    expected = _grads(net)
    net.zero_grad(set_to_none=True)
    backward(net.losses(), net.shared(), get_method("ew", 3, weights=w))
    for name, grad in _grads(net).items():
        if expected[name] is not None:
            torch.testing.assert_close(grad, expected[name])


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.kind == "loss"))
def test_loss_weighting_is_one_backward(name: str) -> None:
    net = _net()
    method = get_method(name, 3)
    _CountBackward.calls = 0
    backward(net.losses(), net.shared(), method)
    assert _CountBackward.calls == 1
    if name == "uw":
        assert all(p.grad is not None for p in method.parameters())


def test_pcgrad_heads_get_their_task_gradient_and_shared_the_aggregate() -> None:
    net = _net()
    losses = net.losses()
    shared = net.shared()
    head_grads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses, net.heads, strict=True)
    ]
    rows = task_jacobian(losses, shared, strategy="loop")
    reference = get_method("pcgrad", 3, generator=torch.Generator().manual_seed(5))
    expected_shared = reference.aggregate(rows, torch.stack(losses).detach())

    method = get_method("pcgrad", 3, generator=torch.Generator().manual_seed(5))
    weights = backward(net.losses(), shared, method)
    torch.testing.assert_close(weights, reference.last_weights)
    for head, grads in zip(net.heads, head_grads, strict=True):
        for p, g in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g)
    for p, g in zip(shared[:-1], expected_shared, strict=False):
        torch.testing.assert_close(p.grad, g)
    assert net.unused.grad is None  # reached by no loss: left alone, like Tensor.backward


@pytest.mark.parametrize("name", ["ew", "pcgrad"])
def test_accumulates_onto_existing_grad(name: str) -> None:
    net = _net()
    backward(net.losses(), net.shared(), get_method(name, 3))
    once = {k: v.clone() for k, v in _grads(net).items() if v is not None}
    backward(net.losses(), net.shared(), get_method(name, 3))
    for key, grad in _grads(net).items():
        if key in once:
            torch.testing.assert_close(grad, 2 * once[key])


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.kind == "gradient"))
def test_every_gradient_method_fills_shared_and_heads(name: str) -> None:
    net = _net()
    method = get_method(name, 3)
    weights = backward(net.losses(), net.shared(), method)
    assert weights is None or weights.shape == (3,)
    for key, grad in _grads(net).items():
        if key != "unused":
            assert grad is not None and torch.isfinite(grad).all(), key


def _mgda_grads(variant: str) -> dict[str, Tensor | None]:
    net = _net()
    losses: Any = net.losses()
    kwargs: dict[str, Any] = {}
    if variant in ("loop", "batched", "autojac"):
        kwargs["strategy"] = variant
    elif variant == "task_params":
        kwargs["task_params"] = list(net.heads.parameters())
    elif variant == "dict":
        losses = dict(zip("abc", losses, strict=True))
    elif variant == "tensor":
        losses = torch.stack(losses)
    backward(losses, net.shared(), get_method("mgda", 3), **kwargs)
    return _grads(net)


@pytest.mark.parametrize("variant", ["batched", "autojac", "task_params", "dict", "tensor"])
def test_variants_agree_with_the_loop(variant: str) -> None:
    expected = _mgda_grads("loop")
    for key, grad in _mgda_grads(variant).items():
        if expected[key] is None:
            assert grad is None, key
        else:
            torch.testing.assert_close(grad, expected[key], rtol=1e-5, atol=1e-7)


def test_frozen_shared_parameter_is_left_alone() -> None:
    net = _net()
    frozen = net.backbone[0].bias.requires_grad_(False)
    backward(net.losses(), net.shared(), get_method("mgda", 3))
    assert frozen.grad is None
    assert net.backbone[0].weight.grad is not None
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        backward(net.losses(), [frozen], get_method("mgda", 3))


def test_non_finite_loss_names_the_task_and_writes_nothing() -> None:
    net = _net()
    losses = net.losses()
    bad = {"seg": losses[0], "depth": losses[1] * float("nan"), "normal": losses[2]}
    with pytest.raises(ValueError, match="'depth'.*nan"):
        backward(bad, net.shared(), get_method("pcgrad", 3))
    with pytest.raises(ValueError, match="task 2 .*inf"):
        backward([losses[0], losses[1], losses[2] * float("inf")], net.shared(), "ew")
    assert all(grad is None for grad in _grads(net).values())


def test_input_validation() -> None:
    net = _net()
    with pytest.raises(ValueError, match="empty"):
        backward([], net.shared(), "ew")
    with pytest.raises(ValueError, match="task 1 must be a scalar"):
        backward([net.losses()[0], torch.ones(2, requires_grad=True)], net.shared(), "ew")
    with pytest.raises(ValueError, match="known: aligned_mtl, cagrad"):
        backward(net.losses(), net.shared(), "nope")
    with pytest.raises(ValueError, match=r"get_method\('gradvac'"):
        backward(net.losses(), net.shared(), "gradvac")
    with pytest.raises(ValueError, match="built for 2 tasks, got 3"):
        backward(net.losses(), net.shared(), get_method("mgda", 2))
    with pytest.raises(ValueError, match="also in shared_params"):
        backward(net.losses(), net.shared(), "mgda", task_params=net.shared()[:1])


def test_missing_solver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def no_quadprog(name: str, *args: Any) -> Any:
        return None if name == "quadprog" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_quadprog)
    net = _net()
    with pytest.raises(ImportError, match=r'quadprog.*pip install "apt-hf\[solvers\]"'):
        backward(net.losses(), net.shared(), "upgrad")

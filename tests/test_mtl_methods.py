"""MTL methods: the name table, per-method contracts, state round trips, defining properties."""

from __future__ import annotations

import importlib.util
import io
from typing import Any

import pytest
import torch
from torch import Tensor

from apt_hf.mtl import (
    METHODS,
    GradientMethod,
    LossWeighting,
    MTLMethod,
    combine,
    flatten_rows,
    get_method,
    gramian,
)

# torchjd's Nash-MTL cvxpy problem is not DPP; cvxpy says so once per problem.
pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem")

T = 3
REQUIRED = {
    "ew", "uw", "dwa", "rlw", "gls", "famo", "pcgrad", "mgda", "cagrad", "nash_mtl", "imtl",
    "aligned_mtl", "graddrop", "gradvac", "upgrad", "dualproj", "config", "fairgrad", "gradnorm",
    "db_mtl",
}  # fmt: skip


def _rows(seed: int, n_tasks: int = T) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n_tasks, 4, 5, generator=generator),
        torch.randn(n_tasks, 7, generator=generator),
    ]


def _losses(seed: int, n_tasks: int = T) -> Tensor:
    return torch.rand(n_tasks, generator=torch.Generator().manual_seed(seed + 1000)) + 0.5


def _step(method: MTLMethod, i: int) -> list[Tensor]:
    """One training step of ``method`` on deterministic inputs; returns what it produced."""
    if isinstance(method, LossWeighting):
        losses = _losses(i).requires_grad_()
        loss = method.combine(losses)
        loss.backward()
        with torch.no_grad():
            for p in method.parameters():  # what a user's optimizer does with UW's parameters
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
                    p.grad = None
        if i % 2 == 0:
            method.update(_losses(i + 500))  # FAMO; other loss weightings ignore it
        if i % 2 == 1:
            method.epoch_end()  # DWA
        return [loss.detach(), method.last_weights]
    assert isinstance(method, GradientMethod)
    out = method.aggregate(_rows(i), _losses(i))
    return [*out, method.last_weights]


def _same(a: list[Tensor | None], b: list[Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


def test_table_holds_the_required_methods() -> None:
    assert set(METHODS) >= REQUIRED
    for name, cls in METHODS.items():
        assert cls.name == name
        assert cls.kind == ("loss" if issubclass(cls, LossWeighting) else "gradient")
        assert cls.paper and cls.__doc__ and cls.__doc__.splitlines()[0].strip()
        assert cls.extra in (None, "solvers")
    with pytest.raises(TypeError):
        METHODS["x"] = METHODS["ew"]  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_output_contract(name: str) -> None:
    method = get_method(name, T)
    for i in range(2):
        out = _step(method, i)
        weights = out[-1]
        if method.kind == "gradient":
            assert [o.shape for o in out[:-1]] == [(4, 5), (7,)]
        else:
            assert out[0].shape == ()
        assert all(torch.isfinite(o).all() for o in out if o is not None)
        assert weights is None or weights.shape == (T,)


@pytest.mark.parametrize("used_before", [False, True])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_round_trip_is_bit_identical(name: str, used_before: bool) -> None:
    run = get_method(name, T, generator=torch.Generator().manual_seed(7))
    for i in range(3):
        _step(run, i)
    buffer = io.BytesIO()
    torch.save(run.method_state(), buffer)
    expected = [_step(run, i) for i in range(3, 6)]

    resumed = get_method(name, T, generator=torch.Generator().manual_seed(99))
    if used_before:
        _step(resumed, 0)  # its state must be replaced, not merged
    buffer.seek(0)
    resumed.load_method_state(torch.load(buffer, weights_only=False))
    for i, want in zip(range(3, 6), expected, strict=True):
        assert _same(_step(resumed, i), want), f"{name} diverged at step {i}"


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.stochastic))
def test_stochastic_methods_follow_the_generator_only(name: str) -> None:
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the global RNG must not matter...
        method = get_method(name, T, generator=torch.Generator().manual_seed(3))
        before = torch.get_rng_state()
        runs.append([_step(method, i) for i in range(3)])
        assert torch.equal(torch.get_rng_state(), before)  # ...nor be touched
    assert all(_same(a, b) for a, b in zip(*runs, strict=True))


def test_get_method_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="known: " + ", ".join(sorted(METHODS))):
        get_method("nope", 2)
    with pytest.raises(TypeError, match="temperatur"):
        get_method("dwa", 2, temperatur=2.0)
    with pytest.raises(ValueError, match="n_tasks"):
        get_method("ew", 0)
    with pytest.raises(ValueError, match="normalization"):
        get_method("mgda", 2, normalization="l1")
    with pytest.raises(ValueError, match="c must be non-negative"):
        get_method("cagrad", 2, c=-1.0)
    with pytest.raises(ValueError, match="weights"):
        get_method("ew", 2, weights=[1.0])

    real_find_spec = importlib.util.find_spec

    def no_cvxpy(name: str, *args: Any) -> Any:
        return None if name == "cvxpy" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_cvxpy)
    for name in ("cagrad", "nash_mtl"):
        with pytest.raises(ImportError, match=r'cvxpy.*pip install "apt-hf\[solvers\]"'):
            get_method(name, 2)


def test_methods_move_with_to() -> None:
    method = get_method("ew", 2, weights=[1.0, 2.0]).to(torch.float64)
    assert method.weights.dtype == torch.float64


# ------------------------------------------------------------------ defining properties


def test_ew_is_the_weighted_sum() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert get_method("ew", 3, weights=[0.5, 1.0, 2.0]).combine(losses).item() == 8.5


def test_pcgrad_removes_the_conflict() -> None:
    rows = [torch.tensor([[1.0, 0.0], [-1.0, 1.0]])]
    (d,) = get_method("pcgrad", 2).aggregate(rows, torch.ones(2))
    # g1 - (g1.g2 / |g2|^2) g2 = [0.5, 0.5];  g2 - (g2.g1 / |g1|^2) g1 = [0, 1];  summed.
    torch.testing.assert_close(d, torch.tensor([0.5, 1.5]))
    assert (rows[0] @ d >= 0).all()


@pytest.mark.parametrize(
    ("g1", "g2", "expected"),
    [([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]), ([2.0, 0.0], [0.0, 1.0], [0.4, 0.8])],
)
def test_mgda_min_norm_point(g1: list[float], g2: list[float], expected: list[float]) -> None:
    method = get_method("mgda", 2)
    (d,) = method.aggregate([torch.tensor([g1, g2])], torch.ones(2))
    torch.testing.assert_close(d, torch.tensor(expected))


@pytest.mark.parametrize(
    ("normalization", "losses"), [("l2", [1.0, 1.0]), ("loss", [2.0, 1.0]), ("loss+", [1.0, 1.0])]
)
def test_mgda_normalization_applies_to_raw_rows(normalization: str, losses: list[float]) -> None:
    # Normalized rows are [1, 0] and [0, 1] (loss+ with unit losses equals l2).
    method = get_method("mgda", 2, normalization=normalization)
    (d,) = method.aggregate([torch.tensor([[2.0, 0.0], [0.0, 1.0]])], torch.tensor(losses))
    torch.testing.assert_close(d, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(method.last_weights, torch.tensor([0.25, 0.5]))


def _conflicting_rows() -> list[Tensor]:
    torch.manual_seed(0)
    base = torch.randn(4, 10)
    base[1] = -0.8 * base[0] + 0.2 * base[1]
    return [base[:, :6], base[:, 6:]]


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_non_conflicting(name: str) -> None:
    rows = _conflicting_rows()
    matrix = flatten_rows(rows)
    exact = torch.cat(get_method(name, 4, reg_eps=1e-8).aggregate(rows, torch.ones(4)))
    assert (matrix @ exact >= -1e-6).all()
    default = torch.cat(get_method(name, 4).aggregate(rows, torch.ones(4)))  # reg_eps = 1e-4
    assert (matrix @ default >= -1e-4 * gramian(rows).trace()).all()


def test_imtl_equal_projections() -> None:
    rows = _conflicting_rows()
    d = torch.cat(get_method("imtl", 4).aggregate(rows, torch.ones(4)))
    matrix = flatten_rows(rows)
    projections = matrix @ d / matrix.norm(dim=1)
    torch.testing.assert_close(projections, projections.mean().expand(4), rtol=1e-4, atol=1e-5)


def test_cagrad_with_c_zero_is_the_mean() -> None:
    rows = _conflicting_rows()
    out = get_method("cagrad", 4, c=0.0).aggregate(rows, torch.ones(4))
    for o, row in zip(out, rows, strict=True):
        torch.testing.assert_close(o, row.mean(dim=0))


def test_db_mtl_first_step_equalises_task_norms() -> None:
    rows, losses = _conflicting_rows(), torch.tensor([0.5, 1.0, 2.0, 4.0])
    method = get_method("db_mtl", 4)
    method.aggregate(rows, losses)
    components = flatten_rows(rows) * (method.last_weights / losses)[:, None]
    norms = components.norm(dim=1)
    torch.testing.assert_close(norms, norms.max().expand(4))


def test_gradnorm_weights_sum_to_t() -> None:
    method = get_method("gradnorm", 4, lr=0.1)
    for i in range(5):
        method.aggregate(_rows(i, 4), _losses(i, 4))
        assert method.weights.sum().item() == pytest.approx(4.0)
        assert (method.weights >= 0).all()
    assert not torch.equal(method.weights.detach(), torch.ones(4))


def test_gramian_methods_combine_their_weights() -> None:
    rows = _conflicting_rows()
    method = get_method("aligned_mtl", 4)
    out = method.aggregate(rows, torch.ones(4))
    for o, e in zip(out, combine(rows, method.last_weights), strict=True):
        torch.testing.assert_close(o, e)
    assert gramian(rows).shape == (4, 4)


def test_nash_mtl_factor_matches_the_full_matrix() -> None:
    from torchjd.aggregation import NashMTL as TorchjdNashMTL

    rows = _conflicting_rows()
    ours = torch.cat(get_method("nash_mtl", 4).aggregate(rows, torch.ones(4)))
    theirs = TorchjdNashMTL(4)(flatten_rows(rows))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_famo_update_is_not_doubled() -> None:
    method = get_method("famo", 2)
    method.combine(torch.tensor([1.0, 2.0]))
    method.update(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="update"):
        method.update(torch.tensor([0.5, 1.5]))
    method.combine(torch.tensor([0.9, 1.9]))  # explicit update already done: no implicit one
    assert method.famo._optimizer.state[method.famo._w]["step"].item() == 1
    method.combine(torch.tensor([0.8, 1.8]))  # no update since: the implicit one runs
    assert method.famo._optimizer.state[method.famo._w]["step"].item() == 2


def test_dwa_weights_follow_loss_ratios_after_two_epochs() -> None:
    method = get_method("dwa", 2)
    for losses in ([1.0, 1.0], [0.5, 1.0]):
        method.combine(torch.tensor(losses))
        method.epoch_end()
    method.combine(torch.tensor([1.0, 1.0]))
    ratios = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(method.last_weights, 2 * torch.softmax(ratios / 2.0, dim=0))

"""``backward``: the one call that replaces ``loss.backward()`` in a plain PyTorch MTL loop."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .jacobian import Strategy, task_jacobian
from .methods import METHODS, GradientMethod, LossWeighting, MTLMethod, get_method


def backward(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
    shared_params: Iterable[Tensor],
    method: MTLMethod | str,
    *,
    task_params: Iterable[Tensor] | None = None,
    strategy: Strategy = "auto",
) -> Tensor | None:
    """Fill ``.grad`` from T task losses with an MTL method; return its ``last_weights``.

    A loss weighting does one backward of ``method.combine(losses)`` (every parameter, the
    method's own ones included, gets its gradient). A gradient method gets the per-task
    gradients over ``shared_params`` from the one forward graph, and their aggregation is added
    to the shared ``.grad``; every other parameter the losses reach (the task heads, or
    ``task_params`` if given) gets sum_k dL_k/dphi, i.e. each head its own task's gradient,
    from the same autograd calls. Like ``Tensor.backward``, gradients accumulate into an
    existing ``.grad``, and a parameter that is frozen or that no loss reaches is left alone.

    ``losses``: T scalar tensors (a sequence, a dict in insertion order, or a 1-D tensor).
    ``method``: an :class:`MTLMethod` built once (``get_method``); the name of a method with
    neither state nor randomness is accepted too. ``strategy``: see ``task_jacobian``.
    """
    keys, loss_list = _as_loss_list(losses)
    stacked = losses if isinstance(losses, Tensor) else torch.stack(loss_list)
    _check_finite(keys, stacked.detach())
    method = _as_method(method, len(keys))

    if isinstance(method, LossWeighting):
        method.combine(stacked).backward()
        return method.last_weights
    if not isinstance(method, GradientMethod):
        raise TypeError(f"method must be a LossWeighting or GradientMethod, got {type(method)}.")

    shared = _trainable(shared_params, "shared_params")
    if not shared:
        raise ValueError(
            "shared_params holds no tensor that requires grad: a gradient method needs the "
            "shared parameters."
        )
    shared_ids = {id(p) for p in shared}
    reached = _reachable_leaves(loss_list)
    if task_params is None:
        heads = [p for i, p in reached.items() if i not in shared_ids]
    else:
        heads = _trainable(task_params, "task_params")
        overlap = [i for i, p in enumerate(heads) if id(p) in shared_ids]
        if overlap:
            raise ValueError(f"task_params{overlap} are also in shared_params.")
        heads = [p for p in heads if id(p) in reached]
    used = [p for p in shared if id(p) in reached]  # a parameter no loss reaches is left alone

    outputs = losses if isinstance(losses, Tensor) else loss_list
    rows = task_jacobian(outputs, used + heads, strategy=strategy) if used or heads else []
    used_rows = dict(zip([id(p) for p in used], rows, strict=False))
    shared_rows = [used_rows.get(id(p), p.new_zeros((len(keys), *p.shape))) for p in shared]
    with torch.no_grad():
        aggregated = method.aggregate(shared_rows, stacked.detach())
        for p, grad in zip(shared, aggregated, strict=True):
            if id(p) in used_rows:
                _accumulate(p, grad)
        for p, row in zip(heads, rows[len(used) :], strict=True):
            _accumulate(p, row.sum(dim=0))
    return method.last_weights


def _as_loss_list(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
) -> tuple[list[object], list[Tensor]]:
    """Task keys (dict keys or indices) and the scalar losses, validated."""
    if isinstance(losses, Tensor):
        if losses.ndim != 1:
            raise ValueError(
                f"losses as a tensor must be 1-D (one loss per task), got shape "
                f"{tuple(losses.shape)}."
            )
        keys: list[object] = list(range(losses.shape[0]))
        loss_list = list(losses.unbind())
    elif isinstance(losses, Mapping):
        keys, loss_list = list(losses.keys()), list(losses.values())
    else:
        loss_list = list(losses)
        keys = list(range(len(loss_list)))
    if not loss_list:
        raise ValueError("losses is empty: pass one scalar loss per task.")
    for key, loss in zip(keys, loss_list, strict=True):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss of task {key!r} must be a tensor, got {type(loss).__name__}.")
        if loss.ndim != 0:
            raise ValueError(
                f"loss of task {key!r} must be a scalar, got shape {tuple(loss.shape)}."
            )
        if not loss.requires_grad:
            raise ValueError(f"loss of task {key!r} does not require grad (no graph to backward).")
    return keys, loss_list


def _check_finite(keys: list[object], values: Tensor) -> None:
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise ValueError(
            f"loss of task {keys[k]!r} is not finite ({values[k].item()}); nothing was written "
            "to .grad."
        )


def _as_method(method: MTLMethod | str, n_tasks: int) -> MTLMethod:
    if isinstance(method, str):
        cls = METHODS.get(method)
        if cls is not None and (cls.stateful or cls.stochastic):
            raise ValueError(
                f"MTL method {method!r} keeps state or a random generator across steps: build it "
                f"once with get_method({method!r}, n_tasks) and pass that instance at every step."
            )
        return get_method(method, n_tasks)
    if not isinstance(method, MTLMethod):
        raise TypeError(f"method must be an MTLMethod or a name, got {type(method).__name__}.")
    if method.n_tasks != n_tasks:
        raise ValueError(
            f"method {method.name!r} was built for {method.n_tasks} tasks, got {n_tasks} losses."
        )
    return method


def _trainable(params: Iterable[Tensor], field: str) -> list[Tensor]:
    """The tensors of ``params`` that require grad (frozen ones get no .grad, as in backward)."""
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{field}[{i}] must be a tensor, got {type(p).__name__}.")
    return [p for p in params if p.requires_grad]


def _reachable_leaves(outputs: list[Tensor]) -> dict[int, Tensor]:
    """The leaf tensors requiring grad that the outputs' autograd graph reaches, by id."""
    found: dict[int, Tensor] = {}
    seen: set[torch.autograd.graph.Node] = set()
    stack = [out.grad_fn for out in outputs if out.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if variable is not None:
            found.setdefault(id(variable), variable)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found


def _accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)

"""Per-task gradients over the shared parameters, from one forward pass.

A "row" is the gradient of one task loss: for each parameter tensor ``p`` the Jacobian is kept
as one tensor of shape ``(T, *p.shape)`` (row ``k`` = dL_k/dp), never concatenated into a
``(T, P)`` matrix unless a method needs that matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torchjd.autojac import jac

Strategy = Literal["auto", "loop", "batched", "autojac"]
STRATEGIES: tuple[str, ...] = ("auto", "loop", "batched", "autojac")

# Strategy used by ``strategy="auto"``, per device type. CPU was measured on a BERT-like encoder
# (transformers BertModel, hidden 256, 4 layers, 4 heads, intermediate 1024, default SDPA
# attention; 11.2 M shared parameters; batch 16 x 64 tokens; T linear heads on the pooled
# output; torch 2.13, 2 CPU threads). Median ms of the Jacobian part only (the ~40 ms forward is
# common to all), 10 interleaved repetitions:
#
#     T    loop   batched   autojac   LibMTL-style loop (loss_k.backward(retain_graph) + .grad copy)
#     2     167       190       200   183
#     4     343       392       426   361
#     8     699       804      1094   709
#
# On CPU the vmapped backward saves nothing (no batching rule for the CPU SDPA backward, so vmap
# loops there anyway). CUDA is unmeasured (no GPU yet), so it loops too: a vmapped backward
# launches T times fewer kernels, but it holds T activation gradients at once (T = 40 for
# CelebA), which can run a GPU out of memory where the loop fits. Measure before changing it.
AUTO_STRATEGY: dict[str, str] = {"cpu": "loop", "cuda": "loop"}

_batched_failed = False  # set once vmap failed in this process: "batched" then loops


def task_jacobian(
    losses: Sequence[Tensor] | Tensor,
    shared_params: Iterable[Tensor],
    *,
    strategy: Strategy = "auto",
    retain_graph: bool = False,
) -> list[Tensor]:
    """Return one tensor ``(T, *p.shape)`` per shared parameter: row k is dL_k/dp.

    All rows come from the one forward graph. A task that does not reach ``p`` gives a zero row.
    ``strategy``: "loop" (T calls of ``torch.autograd.grad``), "batched" (one vmapped call,
    ``is_grads_batched=True``; if an op cannot be vmapped, it warns once and loops from then on),
    "autojac" (``torchjd.autojac.jac``) or "auto" (``AUTO_STRATEGY`` for the losses' device).
    """
    n_tasks = losses.shape[0] if isinstance(losses, Tensor) else len(losses)
    if n_tasks == 0:
        raise ValueError("losses must hold at least one task loss, got none.")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    params = list(shared_params)
    if strategy == "auto":
        device = losses.device if isinstance(losses, Tensor) else losses[0].device
        strategy = AUTO_STRATEGY.get(device.type, "loop")  # type: ignore[assignment]
    if strategy == "autojac":
        outputs = losses if isinstance(losses, Tensor) else list(losses)
        return list(jac(outputs, params, retain_graph=retain_graph))
    if strategy == "batched":
        return _batched(losses, params, retain_graph)
    return _loop(losses, params, retain_graph)


def _loop(
    losses: Sequence[Tensor] | Tensor, params: list[Tensor], retain_graph: bool
) -> list[Tensor]:
    """T backward calls; all but the last keep the graph."""
    n_tasks = losses.shape[0] if isinstance(losses, Tensor) else len(losses)
    per_task: list[tuple[Tensor | None, ...]] = []
    for k in range(n_tasks):
        keep = retain_graph or k < n_tasks - 1
        if isinstance(losses, Tensor):
            one_hot = torch.zeros_like(losses)
            one_hot[k] = 1.0
            grads = torch.autograd.grad(
                losses, params, one_hot, retain_graph=keep, allow_unused=True
            )
        else:
            grads = torch.autograd.grad(losses[k], params, retain_graph=keep, allow_unused=True)
        per_task.append(grads)
    return [
        torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per_task])
        for i, p in enumerate(params)
    ]


def _batched(
    losses: Sequence[Tensor] | Tensor, params: list[Tensor], retain_graph: bool
) -> list[Tensor]:
    """One backward vmapped over the T one-hot cotangents (the rows of the identity).

    The graph is kept during the attempt (it is freed with the losses) so that the "loop"
    fallback can still run if vmap rejects an op halfway through the backward.
    """
    global _batched_failed
    if _batched_failed:
        return _loop(losses, params, retain_graph)
    if isinstance(losses, Tensor):
        outputs = [losses]
        cotangents = [torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)]
    else:
        outputs = list(losses)
        eye = torch.eye(len(outputs), dtype=outputs[0].dtype, device=outputs[0].device)
        cotangents = [eye[:, k].to(loss.dtype) for k, loss in enumerate(outputs)]
    try:
        rows = torch.autograd.grad(
            outputs,
            params,
            cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError as error:
        _batched_failed = True
        warnings.warn(
            f"task_jacobian: the batched (vmap) backward failed ({error}); this process uses "
            'the per-task "loop" strategy from now on. Pass strategy="loop" to silence this.',
            RuntimeWarning,
            stacklevel=3,
        )
        return _loop(losses, params, retain_graph)
    n_tasks = cotangents[0].shape[0]
    return [
        p.new_zeros((n_tasks, *p.shape)) if row is None else row
        for p, row in zip(params, rows, strict=True)
    ]


def gramian(rows: Sequence[Tensor]) -> Tensor:
    """G = sum_i R_i R_i^T with R_i = rows[i].flatten(1): the (T, T) inner products g_j . g_k.

    Computed in float32 at least (float64 rows stay float64), without concatenating the rows.
    """
    dtype = torch.promote_types(rows[0].dtype, torch.float32)
    total = torch.zeros(rows[0].shape[0], rows[0].shape[0], dtype=dtype, device=rows[0].device)
    for row in rows:
        matrix = row.flatten(1).to(dtype)
        total += matrix @ matrix.T
    return total


def combine(rows: Sequence[Tensor], weights: Tensor) -> list[Tensor]:
    """Per tensor, sum_k w_k rows[i][k]: the weighted sum of the task gradients."""
    return [torch.tensordot(weights.to(row), row, dims=1) for row in rows]


def flatten_rows(rows: Sequence[Tensor]) -> Tensor:
    """Concatenate the rows into the (T, P) Jacobian matrix (only for matrix-based methods)."""
    return torch.cat([row.flatten(1) for row in rows], dim=1)


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a (P,) vector into tensors shaped like ``like`` (inverse of a row's flattening)."""
    sizes = [t.numel() for t in like]
    if vector.numel() != sum(sizes):
        raise ValueError(f"vector has {vector.numel()} elements, like needs {sum(sizes)}.")
    return [part.view_as(t) for part, t in zip(torch.split(vector, sizes), like, strict=True)]

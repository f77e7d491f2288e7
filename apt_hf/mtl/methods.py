"""Closed name -> method table of multi-task-learning (MTL) methods.

Two kinds. A loss weighting (``kind="loss"``) turns the T task losses into one scalar to
backward and never needs the per-task gradients. A gradient method (``kind="gradient"``) turns
the per-task gradients over the shared parameters (the rows, see :mod:`apt_hf.mtl.jacobian`)
into one shared gradient. Most methods are thin adapters over torchjd; GradNorm and DB-MTL,
which torchjd lacks, are written here. Methods whose torchjd weighting reads the Jacobian J only
through its Gramian G = J J^T get G from the rows directly (no T x P concatenation).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchjd import aggregation as agg
from torchjd import scalarization as scal
from torchjd.linalg import QuadprogProjector

from .jacobian import combine, flatten_rows, gramian, unflatten

_FAMO_EPS = 1e-8  # torchjd FAMO's epsilon inside log(L - b + eps), needed for its weights


class MTLMethod(nn.Module, ABC):
    """Base of all MTL methods: validation, optional-solver check, seeded randomness, state.

    ``last_weights`` holds the task weights of the last call (detached, shape (T,)), or None for
    a method whose update is no weighting of the tasks. Unless a class says otherwise they are
    the w_k of the update's gradient sum_k w_k g_k.

    ``generator`` is the only randomness source of stochastic methods. It defaults to a CPU
    ``torch.Generator`` seeded 0, so every process of a distributed run draws the same numbers
    unless told otherwise; the global torch RNG is never touched.

    A method is a module: move it with ``.to(device)`` like the model (UW and FAMO use their
    tensors in the loss). ``parameters()``: only UW's (its log-variances) need your optimizer;
    pass them with the model's. FAMO and GradNorm step their own parameters and never leave a
    ``.grad`` on them.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    paper: ClassVar[str]
    extra: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()  # modules the extra installs
    stochastic: ClassVar[bool] = False
    stateful: ClassVar[bool] = False

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}.")
        missing = [module for module in self.requires if importlib.util.find_spec(module) is None]
        if missing:
            raise ImportError(
                f"MTL method {self.name!r} needs {', '.join(missing)}. "
                f'Install them with: pip install "apt-hf[{self.extra}]"'
            )
        self.n_tasks = n_tasks
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.last_weights: Tensor | None = None

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"

    def epoch_end(self) -> None:
        """Tell the method an epoch ended (DWA uses it); a no-op by default."""

    def method_state(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically; a copy, picklable with ``torch.save``."""
        return {
            "tensors": {key: value.clone() for key, value in self.state_dict().items()},
            "plain": copy.deepcopy(self._plain_state()),
            "generator": self.generator.get_state(),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""
        self._load_plain_state(copy.deepcopy(state["plain"]))
        self.load_state_dict(state["tensors"])
        self.generator.set_state(state["generator"])

    def _plain_state(self) -> dict[str, Any]:
        """State kept outside parameters and buffers (attributes, internal optimizers)."""
        return {}

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_plain_state`; runs before the parameters and buffers are loaded."""

    def _check_losses(self, losses: Tensor) -> None:
        if losses.shape != (self.n_tasks,):
            raise ValueError(
                f"{self.name}: losses must have shape ({self.n_tasks},), got {tuple(losses.shape)}."
            )

    @contextmanager
    def _seeded_global_rng(self, device: torch.device) -> Iterator[None]:
        """Run code drawing from the global RNG (torchjd's) on a seed taken from ``generator``.

        The global CPU RNG (and the RNG of ``device`` if it is an accelerator) is forked, so it
        is left exactly as it was.
        """
        seed = int(torch.randint(2**62, (), generator=self.generator, device=self.generator.device))
        if device.type == "cpu":
            with torch.random.fork_rng(devices=[], device_type="cpu"):
                torch.random.default_generator.manual_seed(seed)
                yield
            return
        module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        with torch.random.fork_rng(devices=[index], device_type=device.type), module.device(index):
            torch.random.default_generator.manual_seed(seed)
            module.manual_seed(seed)
            yield


class LossWeighting(MTLMethod):
    """A method that only reweights the losses: one backward of the returned scalar."""

    kind = "loss"

    @abstractmethod
    def combine(self, losses: Tensor) -> Tensor:
        """Map the (T,) losses (with grad) to the scalar to backward; set ``last_weights``."""

    def update(self, losses_after: Tensor) -> None:
        """Learn from the losses recomputed after the optimizer step; only FAMO uses it."""


class GradientMethod(MTLMethod):
    """A method that maps the per-task gradients of the shared parameters to one gradient."""

    kind = "gradient"

    @abstractmethod
    def aggregate(self, rows: list[Tensor], losses: Tensor) -> list[Tensor]:
        """Map rows[i] (T, *shape_i) and the detached (T,) losses to one gradient per tensor."""

    def _check_rows(self, rows: Sequence[Tensor], losses: Tensor) -> None:
        self._check_losses(losses)
        if len(rows) == 0:
            raise ValueError(f"{self.name}: rows must hold at least one tensor, got none.")
        for i, row in enumerate(rows):
            if row.ndim == 0 or row.shape[0] != self.n_tasks:
                raise ValueError(
                    f"{self.name}: rows[{i}] must have {self.n_tasks} rows (one per task), "
                    f"got shape {tuple(row.shape)}."
                )


class _GramianWeighted(GradientMethod):
    """d = sum_k w_k g_k with w read from the Gramian G_jk = g_j . g_k of the rows."""

    weighting: nn.Module

    def aggregate(self, rows: list[Tensor], losses: Tensor) -> list[Tensor]:
        self._check_rows(rows, losses)
        gram = gramian(rows)
        with self._seeded_global_rng(gram.device) if self.stochastic else nullcontext():
            weights = self._weights(rows, gram, losses)
        self.last_weights = weights.detach()
        return combine(rows, weights)

    def _weights(self, rows: list[Tensor], gram: Tensor, losses: Tensor) -> Tensor:
        return self.weighting(gram)


# --------------------------------------------------------------------------- loss weighting


class EW(LossWeighting):
    """Equal (linear-scalarization) weighting: L = sum_k w_k L_k, w = 1 by default.

    With the default weights, training with EW is ordinary training on the summed loss.
    """

    name = "ew"
    paper = "Linear scalarization sum_k w_k L_k (equal weighting), the standard MTL baseline"

    def __init__(
        self,
        n_tasks: int,
        *,
        weights: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        w = torch.ones(n_tasks) if weights is None else torch.as_tensor(weights).float()
        if w.shape != (n_tasks,) or not torch.isfinite(w).all():
            raise ValueError(f"weights must be {n_tasks} finite numbers, got {weights!r}.")
        self.register_buffer("weights", w.clone())

    def combine(self, losses: Tensor) -> Tensor:
        self._check_losses(losses)
        self.last_weights = self.weights.clone()
        return (self.weights.to(losses) * losses).sum()


class UW(LossWeighting):
    """Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses, CVPR 2018.

    L = sum_k (exp(-s_k) L_k + s_k) / 2 with learnable log-variances s (torchjd UW). The s_k are
    this module's parameters: pass ``method.parameters()`` to your optimizer with the model's.
    """

    name = "uw"
    paper = "Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses, CVPR 2018"
    stateful = True

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__(n_tasks, generator=generator)
        self.uw = scal.UW(n_tasks)

    def combine(self, losses: Tensor) -> Tensor:
        self._check_losses(losses)
        self.last_weights = (0.5 * torch.exp(-self.uw.log_var)).detach()
        return self.uw(losses)


class DWA(LossWeighting):
    """Liu et al., End-to-End Multi-Task Learning with Attention (DWA), CVPR 2019.

    w_k = T softmax_k(r_k / temperature), r_k = L_k(epoch - 1) / L_k(epoch - 2), uniform for the
    first two epochs (torchjd DWA). Call :meth:`epoch_end` once at the end of every epoch.
    """

    name = "dwa"
    paper = "Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019"
    stateful = True

    def __init__(
        self, n_tasks: int, *, temperature: float = 2.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        self.dwa = scal.DWA(temperature=temperature)

    def combine(self, losses: Tensor) -> Tensor:
        self._check_losses(losses)
        self.last_weights = self.dwa._compute_weights(losses.detach())
        return self.dwa(losses)

    def epoch_end(self) -> None:
        """Close the epoch: its mean losses become the newest entry of the DWA history."""
        self.dwa.step()

    def _plain_state(self) -> dict[str, Any]:
        return {
            "loss_sum": self.dwa._loss_sum,
            "n_batches": self.dwa._n_batches,
            "previous_averages": self.dwa._previous_averages,
        }

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        self.dwa._loss_sum = state["loss_sum"]
        self.dwa._n_batches = state["n_batches"]
        self.dwa._previous_averages = state["previous_averages"]


class RLW(LossWeighting):
    """Lin et al., Reasonable Effectiveness of Random Weighting (RLW), TMLR 2022.

    w = softmax(z), z ~ N(0, I) drawn from ``generator`` at every call (as in LibMTL).
    """

    name = "rlw"
    paper = (
        "Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
        "Multi-Task Learning, TMLR 2022"
    )
    stochastic = True

    def combine(self, losses: Tensor) -> Tensor:
        self._check_losses(losses)
        z = torch.randn(self.n_tasks, generator=self.generator, device=self.generator.device)
        weights = torch.softmax(z, dim=0).to(device=losses.device, dtype=losses.dtype)
        self.last_weights = weights
        return (weights * losses).sum()


class GLS(LossWeighting):
    """Chennupati et al., MultiNet++ (geometric loss strategy), CVPRW 2019.

    L = (prod_k L_k)^(1/T) (torchjd GeometricMean); the weight of g_k is L / (T L_k).
    Losses must be positive.
    """

    name = "gls"
    paper = (
        "Chennupati et al., MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss "
        "Strategy for Multi-Task Learning, CVPR Workshops 2019"
    )

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__(n_tasks, generator=generator)
        self.geometric_mean = scal.GeometricMean()

    def combine(self, losses: Tensor) -> Tensor:
        self._check_losses(losses)
        loss = self.geometric_mean(losses)
        self.last_weights = (loss / (self.n_tasks * losses)).detach()
        return loss


class FAMO(LossWeighting):
    """Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023 (torchjd FAMO).

    L = c sum_k z_k log(L_k - b_k + eps), z = softmax(xi), c = 1 / sum_k z_k / (L_k - b_k + eps);
    the logits xi take one internal Adam step per :meth:`update`, which should get the losses
    recomputed on the same batch after the optimizer step. If ``update`` was not called since
    the last :meth:`combine`, the next ``combine`` uses its own (new batch) losses as the
    "after" losses instead: a cheap approximation that saves the second forward.
    Losses must stay above ``min_losses`` (default 0).
    """

    name = "famo"
    paper = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023"
    stateful = True

    def __init__(
        self,
        n_tasks: int,
        *,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        bounds = None if min_losses is None else torch.as_tensor(min_losses).float()
        self.famo = scal.FAMO(n_tasks, min_losses=bounds, lr=lr, weight_decay=weight_decay)
        self._awaiting_update = False

    def combine(self, losses: Tensor) -> Tensor:
        self._check_losses(losses)
        if self._awaiting_update:
            self.famo.update(losses.detach())
        loss = self.famo(losses)
        self._awaiting_update = True
        z = torch.softmax(self.famo._w.detach(), dim=0)
        shifted = losses.detach() - self.famo.min_losses + _FAMO_EPS
        self.last_weights = z / shifted / (z / shifted).sum()
        return loss

    def update(self, losses_after: Tensor) -> None:
        """One Adam step on the logits from log L_k(before) - log L_k(after) of this batch."""
        if not self._awaiting_update:
            raise ValueError(
                "famo: update() must follow combine(), at most once per step; it was called "
                "without a combine() since the last update."
            )
        self._check_losses(losses_after)
        self.famo.update(losses_after)
        self._awaiting_update = False

    def _plain_state(self) -> dict[str, Any]:
        return {
            "optimizer": (
                None if self.famo._optimizer is None else self.famo._optimizer.state_dict()
            ),
            "prev_losses": self.famo._prev_losses,
            "awaiting_update": self._awaiting_update,
        }

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        self.famo._optimizer = None
        if state["optimizer"] is not None:
            self.famo._optimizer = torch.optim.Adam(
                [self.famo._w], lr=self.famo.lr, weight_decay=self.famo.weight_decay
            )
            self.famo._optimizer.load_state_dict(state["optimizer"])
        self.famo._prev_losses = state["prev_losses"]
        self._awaiting_update = state["awaiting_update"]


# --------------------------------------------------------------------------- gradient methods


class PCGrad(_GramianWeighted):
    """Yu et al., Gradient Surgery for Multi-Task Learning (PCGrad), NeurIPS 2020.

    Each g_i is projected off every conflicting g_j (g_i . g_j < 0), j in random order, and the
    projected gradients are summed (torchjd PCGradWeighting).
    """

    name = "pcgrad"
    paper = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    stochastic = True

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__(n_tasks, generator=generator)
        self.weighting = agg.PCGradWeighting()


class MGDA(_GramianWeighted):
    """Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization (MGDA), NeurIPS 2018.

    The min-norm point of the convex hull of the g_k / n_k (Frank-Wolfe, torchjd MGDAWeighting)
    with n_k from ``normalization``: "none" (1), "l2" (||g_k||), "loss" (L_k), "loss+"
    (L_k ||g_k||). The weights are rescaled by 1 / n_k so that they apply to the raw rows
    (as LibMTL does; Sener & Koltun's script applies the unscaled weights to the raw losses).
    """

    name = "mgda"
    paper = "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    NORMALIZATIONS: ClassVar[tuple[str, ...]] = ("none", "l2", "loss", "loss+")

    def __init__(
        self,
        n_tasks: int,
        *,
        normalization: Literal["none", "l2", "loss", "loss+"] = "none",
        epsilon: float = 1e-3,
        max_iters: int = 100,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        if normalization not in self.NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {self.NORMALIZATIONS}, got {normalization!r}."
            )
        self.normalization = normalization
        self.weighting = agg.MGDAWeighting(epsilon=epsilon, max_iters=max_iters)

    def _weights(self, rows: list[Tensor], gram: Tensor, losses: Tensor) -> Tensor:
        norms = gram.diagonal().clamp_min(0).sqrt()
        scale = {
            "none": torch.ones_like(norms),
            "l2": norms,
            "loss": losses.to(gram),
            "loss+": losses.to(gram) * norms,
        }[self.normalization]
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        return self.weighting(gram / torch.outer(scale, scale)) / scale


class CAGrad(_GramianWeighted):
    """Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021.

    d = g_0 + (sqrt(phi) / ||g_w||) g_w, the best worst-case improvement in a ball of radius
    c ||g_0|| around the mean g_0 (torchjd CAGradWeighting; no final 1 / (1 + c^2) rescale).
    """

    name = "cagrad"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    extra = "solvers"
    requires = ("cvxpy", "clarabel")

    def __init__(
        self,
        n_tasks: int,
        *,
        c: float = 0.4,
        norm_eps: float = 1e-4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        self.weighting = agg.CAGradWeighting(c=c, norm_eps=norm_eps)


class NashMTL(_GramianWeighted):
    """Navon et al., Multi-Task Learning as a Bargaining Game (Nash-MTL), ICML 2022.

    torchjd's Nash-MTL weighting reads the Jacobian J only through J J^T and ||w^T J||, so a
    T x T factor F with F F^T = G stands in for the T x P matrix (same weights, no
    concatenation). The cvxpy problem is rebuilt after :meth:`load_method_state`.
    """

    name = "nash_mtl"
    paper = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    extra = "solvers"
    requires = ("cvxpy", "ecos")
    stateful = True

    def __init__(
        self,
        n_tasks: int,
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        self.weighting = agg.NashMTL(
            n_tasks,
            max_norm=max_norm,
            update_weights_every=update_weights_every,
            optim_niter=optim_niter,
        ).weighting
        self._rebuild_problem = False

    def _weights(self, rows: list[Tensor], gram: Tensor, losses: Tensor) -> Tensor:
        if self._rebuild_problem:
            self.weighting._init_optim_problem()
            self._rebuild_problem = False
        eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
        factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()
        return self.weighting(factor.to(gram.dtype))

    def _plain_state(self) -> dict[str, Any]:
        weighting = self.weighting
        return {
            "prvs_alpha": weighting.prvs_alpha,
            "normalization_factor": weighting.normalization_factor,
            "init_gtg": weighting.init_gtg,
            "step": weighting.step,
        }

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        weighting = self.weighting
        weighting.prvs_alpha = state["prvs_alpha"]
        weighting.normalization_factor = state["normalization_factor"]
        weighting.init_gtg = state["init_gtg"]
        weighting.step = state["step"]
        self._rebuild_problem = weighting.step > 0


class IMTLG(_GramianWeighted):
    """Liu et al., Towards Impartial Multi-task Learning (IMTL-G), ICLR 2021.

    d = sum_k w_k g_k with equal projections d . g_k / ||g_k|| for all k and sum_k w_k = 1
    (torchjd IMTLGWeighting, which also handles linearly dependent gradients).
    """

    name = "imtl"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__(n_tasks, generator=generator)
        self.weighting = agg.IMTLGWeighting()


class AlignedMTL(_GramianWeighted):
    """Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023.

    The task gradients are made orthogonal with equal norms (scaled by the smallest, median or
    mean eigenvalue of G, ``scale_mode``) before averaging (torchjd AlignedMTLWeighting).
    """

    name = "aligned_mtl"
    paper = "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023"

    def __init__(
        self,
        n_tasks: int,
        *,
        scale_mode: Literal["min", "median", "rmse"] = "min",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
        self.weighting = agg.AlignedMTLWeighting(scale_mode=scale_mode)


class GradVac(_GramianWeighted):
    """Wang et al., Gradient Vaccine (GradVac), ICLR 2021.

    Like PCGrad, but each pair is pushed towards an EMA target cosine phi_ij (decay ``beta``)
    instead of 0 (torchjd GradVacWeighting; random pair order, EMA state).
    """

    name = "gradvac"
    paper = (
        "Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization in "
        "Massively Multilingual Models, ICLR 2021"
    )
    stochastic = True
    stateful = True

    def __init__(
        self,
        n_tasks: int,
        *,
        beta: float = 0.5,
        eps: float = 1e-8,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        self.weighting = agg.GradVacWeighting(beta=beta, eps=eps)

    def _plain_state(self) -> dict[str, Any]:
        return {"state_key": self.weighting._state_key}

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        self.weighting.reset()
        if state["state_key"] is not None:
            # Allocate the EMA buffer so that load_state_dict has a slot to fill.
            n, dtype = state["state_key"]
            self.weighting._phi_t = torch.zeros(n, n, dtype=dtype)
            self.weighting._state_key = state["state_key"]


class _DualCone(_GramianWeighted):
    """A torchjd weighting that projects onto the dual cone of the task gradients with a
    quadprog QP regularised by ``reg_eps`` (UPGrad, DualProj)."""

    extra = "solvers"
    requires = ("qpsolvers", "quadprog")
    weighting_class: ClassVar[type]

    def __init__(
        self, n_tasks: int, *, reg_eps: float = 1e-4, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        self.weighting = self.weighting_class(projector=QuadprogProjector(reg_eps=reg_eps))


class UPGrad(_DualCone):
    """Quinton & Rey, Jacobian Descent for Multi-Objective Optimization (UPGrad), 2024.

    Each g_k is projected onto the dual cone of all task gradients and the projections are
    averaged, so d . g_k >= 0 for every k (torchjd UPGradWeighting, quadprog QP). The QP
    regularises the trace-normalised Gramian by ``reg_eps`` (torchjd's default), which lets
    d . g_k dip below 0 by about reg_eps sum_j ||g_j||^2; a smaller value makes the cone exact
    but the QP less robust to a singular Gramian.
    """

    name = "upgrad"
    paper = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv 2406.16232"
    weighting_class = agg.UPGradWeighting


class DualProj(_DualCone):
    """Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017.

    The mean gradient projected onto the dual cone of the task gradients (d . g_k >= 0), as in
    GEM's Equation 11 (torchjd DualProjWeighting, quadprog QP; ``reg_eps`` as in UPGrad).
    """

    name = "dualproj"
    paper = "Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017"
    weighting_class = agg.DualProjWeighting


class FairGrad(_GramianWeighted):
    """Ban & Ji, Fair Resource Allocation in Multi-Task Learning (FairGrad), ICML 2024.

    w solves G w = w^(-1/alpha) (alpha-fairness; alpha = 1 proportional fairness), via scipy
    least squares (torchjd FairGradWeighting).
    """

    name = "fairgrad"
    paper = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
    extra = "solvers"
    requires = ("scipy",)

    def __init__(
        self,
        n_tasks: int,
        *,
        alpha: float = 1.0,
        max_iters: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}.")
        self.weighting = agg.FairGradWeighting(alpha=alpha, max_iters=max_iters)


class GradNorm(_GramianWeighted):
    """Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing, ICML 2018.

    d = sum_k w_k g_k with learnable w (init 1). After each call w takes one Adam step (own
    ``lr``) on the GradNorm loss sum_k |w_k ||g_k|| - mean_j(w_j ||g_j||) r_k^alpha|, the target
    held constant, with r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)) and L(0) the losses of the
    first call; then w is clipped at 0 and rescaled to sum_k w_k = T. ``layer="last"`` measures
    ||g_k|| on the last shared tensor only (the paper's choice), ``"all"`` on all of them.
    w is stepped here and never gets a .grad: do not give it to your optimizer.
    """

    name = "gradnorm"
    paper = (
        "Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
        "Multitask Networks, ICML 2018"
    )
    stateful = True

    def __init__(
        self,
        n_tasks: int,
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        layer: Literal["all", "last"] = "all",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}.")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        if layer not in ("all", "last"):
            raise ValueError(f"layer must be 'all' or 'last', got {layer!r}.")
        self.alpha = alpha
        self.layer = layer
        self.weights = nn.Parameter(torch.ones(n_tasks))
        self._optimizer = torch.optim.Adam([self.weights], lr=lr)
        self._initial_losses: Tensor | None = None

    def _weights(self, rows: list[Tensor], gram: Tensor, losses: Tensor) -> Tensor:
        used = self.weights.detach().clone()
        norm_gram = gram if self.layer == "all" else gramian(rows[-1:])
        norms = norm_gram.diagonal().clamp_min(0).sqrt().to(self.weights)
        losses = losses.to(self.weights)
        if self._initial_losses is None:
            self._initial_losses = losses.clone()
        ratios = losses / self._initial_losses
        rates = ratios / ratios.mean()
        with torch.enable_grad():
            weighted_norms = self.weights * norms
            target = (weighted_norms.mean() * rates**self.alpha).detach()
            gradnorm_loss = (weighted_norms - target).abs().sum()
            (self.weights.grad,) = torch.autograd.grad(gradnorm_loss, self.weights)
        self._optimizer.step()
        self.weights.grad = None
        with torch.no_grad():
            self.weights.clamp_(min=0)
            self.weights.mul_(self.n_tasks / self.weights.sum())
        return used

    def _plain_state(self) -> dict[str, Any]:
        return {
            "optimizer": self._optimizer.state_dict(),
            "initial_losses": self._initial_losses,
        }

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state["optimizer"])
        self._initial_losses = state["initial_losses"]


class DBMTL(GradientMethod):
    """Lin et al., Dual-Balancing for Multi-Task Learning (DB-MTL), arXiv 2308.12029, 2023.

    Loss-scale balancing: the task gradients of log L_k, g_k / L_k. Gradient-magnitude
    balancing: an EMA per task, h_k <- beta_t h_k + (1 - beta_t) g_k / L_k with
    beta_t = beta / t^beta_sigma, then d = sum_k alpha_k h_k with alpha_k = max_j ||h_j|| / ||h_k||,
    so every task contributes with the largest norm. ``last_weights`` are the alpha_k (they
    scale the EMA gradients, not the current g_k). Losses must be positive.
    """

    name = "db_mtl"
    paper = "Lin et al., Dual-Balancing for Multi-Task Learning, arXiv 2308.12029, 2023"
    stateful = True

    def __init__(
        self,
        n_tasks: int,
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        eps: float = 1e-8,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(n_tasks, generator=generator)
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
        if beta_sigma < 0:
            raise ValueError(f"beta_sigma must be >= 0, got {beta_sigma!r}.")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}.")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.eps = eps
        self.step = 0
        self._ema: list[Tensor] | None = None

    def aggregate(self, rows: list[Tensor], losses: Tensor) -> list[Tensor]:
        self._check_rows(rows, losses)
        self.step += 1
        beta_t = self.beta / self.step**self.beta_sigma
        if self._ema is None:
            self._ema = [torch.zeros_like(row) for row in rows]
        inverse_losses = 1.0 / (losses + self.eps)
        for ema, row in zip(self._ema, rows, strict=True):
            log_grad = row * inverse_losses.to(row).view(-1, *([1] * (row.ndim - 1)))
            ema.mul_(beta_t).add_(log_grad, alpha=1.0 - beta_t)
        norms = gramian(self._ema).diagonal().clamp_min(0).sqrt()
        alpha = norms.max() / (norms + self.eps)
        self.last_weights = alpha
        return combine(self._ema, alpha)

    def _plain_state(self) -> dict[str, Any]:
        return {"step": self.step, "ema": self._ema}

    def _load_plain_state(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self._ema = state["ema"]


class GradDrop(GradientMethod):
    """Chen et al., Just Pick a Sign: Gradient Sign Dropout (GradDrop), NeurIPS 2020.

    Per coordinate, keep only the positive or only the negative task gradients, choosing
    positive with probability P = (1 + sum_k g_k / sum_k |g_k|) / 2 (torchjd GradDrop). The rule
    is elementwise, so it runs tensor by tensor without concatenating the rows.
    """

    name = "graddrop"
    paper = (
        "Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign "
        "Dropout, NeurIPS 2020"
    )
    stochastic = True

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__(n_tasks, generator=generator)
        self.graddrop = agg.GradDrop()

    def aggregate(self, rows: list[Tensor], losses: Tensor) -> list[Tensor]:
        self._check_rows(rows, losses)
        with self._seeded_global_rng(rows[0].device):
            return [self.graddrop(row.flatten(1)).view_as(row[0]) for row in rows]


class ConFIG(GradientMethod):
    """Liu et al., ConFIG: Towards Conflict-free Training of PINNs, ICLR 2025.

    d = (sum_k g_k . u) u with u the unit vector of pinv([g_1/||g_1||; ...]) 1: the direction
    with equal cosine to every task gradient (torchjd ConFIG, on the (T, P) matrix).
    """

    name = "config"
    paper = (
        "Liu et al., ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks, "
        "ICLR 2025"
    )

    def __init__(self, n_tasks: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__(n_tasks, generator=generator)
        self.config = agg.ConFIG()

    def aggregate(self, rows: list[Tensor], losses: Tensor) -> list[Tensor]:
        self._check_rows(rows, losses)
        matrix = flatten_rows(rows)
        vector = self.config(matrix.to(torch.promote_types(matrix.dtype, torch.float32)))
        return unflatten(vector.to(matrix.dtype), [row[0] for row in rows])


METHODS: Mapping[str, type[MTLMethod]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            EW,
            UW,
            DWA,
            RLW,
            GLS,
            FAMO,
            PCGrad,
            MGDA,
            CAGrad,
            NashMTL,
            IMTLG,
            AlignedMTL,
            GradDrop,
            GradVac,
            UPGrad,
            DualProj,
            ConFIG,
            FairGrad,
            GradNorm,
            DBMTL,
        )
    }
)


def get_method(
    name: str, n_tasks: int, *, generator: torch.Generator | None = None, **kwargs: Any
) -> MTLMethod:
    """Build the method registered under ``name`` for ``n_tasks`` tasks; kwargs go to its class."""
    if name not in METHODS:
        raise ValueError(f"Unknown MTL method {name!r}; known: {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "n_tasks"})
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"MTL method {name!r} got unknown keyword argument(s) {unknown}; it accepts {accepted}."
        )
    return cls(n_tasks, generator=generator, **kwargs)

"""APT-wrapped AdamW and Muon: cosine-similarity adaptive momentum plus direction preservation.

One ``torch.optim.Optimizer`` serves both algorithms: every param group carries an
``algorithm`` key ("adamw" or "muon"), so a Muon run with AdamW for embeddings, norms, biases and
heads is one optimizer whose ``param_groups`` are the live group dicts (LR schedulers, gradient
clipping, accelerate's wrapper and checkpoints see everything). ``apt`` turns the adaptive
momentum on per group; a group with ``apt=False`` is the plain base optimizer.

Adaptive momentum (per tensor, or once per group with granularity "global")::

    c_t    = <g_t, m_{t-1}> / (||g_t|| ||m_{t-1}|| + eps)        (c_1 := 1)
    beta_t = beta_min + (beta_max - beta_min) * s(c_t),  s = (1 + c) / 2 or max(c, 0)

AdamW-APT: m_t = beta_t m_{t-1} + (1 - beta_t) g_t, P_t = P_{t-1} beta_t, and m_t / (1 - P_t) is
the bias-corrected first moment (torch's 1 - beta1^t is wrong once beta varies).
Muon-APT: B_t = beta_t B_{t-1} + (1 - beta_t) g_t, u_t = beta_t B_t + (1 - beta_t) g_t (nesterov),
O_t = NS(DP(u_t)), theta <- theta (1 - lr wd) - lr_adj O_t.

||m_t||^2 is carried as a scalar by the recursion in ``ema_sq_norm`` so the cosine costs two
reductions (<g, m>, ||g||^2) and no extra pass over m.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .functional import (
    ADJUST_LR,
    BETA_MAPS,
    DIRECTION_PRESERVATION,
    GRANULARITIES,
    NS_COEFFICIENTS,
    NS_DTYPES,
    NS_EPS,
    adjusted_lr,
    beta_from_cos,
    cosine,
    direction_preservation,
    ema_sq_norm,
    zeropower_via_newtonschulz,
)

ALGORITHMS = ("adamw", "muon")
#: Defaults chosen from benchmarks/ablation_apt.py (numbers in docs/algorithm.md).
DEFAULT_BETA_MIN_ADAMW = 0.8
DEFAULT_BETA_MIN_MUON = 0.8
DEFAULT_DIRECTION_PRESERVATION = "instant"
DEFAULT_DP_GAMMA = 0.5


class _Moment(NamedTuple):
    """What the adaptive momentum computed for a group: the betas (a float when fixed) and,
    with APT on, <g, m_{t-1}>, ||g||^2 and ||m_t||^2 per tensor."""

    beta: Tensor | float
    dots: Tensor | None = None
    g_sq: Tensor | None = None
    m_sq: Tensor | None = None


_DIAG_KEYS = ("beta_mean", "beta_min_seen", "cos_mean", "instant_share", "update_cos")


def _check_range(name: str, value: Any, low: float, high: float, *, high_open: bool = True) -> None:
    ok = (
        isinstance(value, (int, float))
        and low <= value
        and (value < high if high_open else value <= high)
    )
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range: allowed [{low}, {high}{bracket}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {list(choices)}")


class APTOptimizer(Optimizer):
    """Shared machinery of :class:`APTAdamW` and :class:`APTMuon` (see the module docstring).

    Per-group keys: ``algorithm``, ``lr``, ``weight_decay``, ``apt``, ``beta_min``, ``beta_max``,
    ``beta_map``, ``granularity``, ``cos_eps``; AdamW groups add ``betas`` and ``eps``; Muon groups
    add ``momentum``, ``nesterov``, ``ns_steps``, ``ns_coefficients``, ``ns_eps``, ``ns_dtype``,
    ``adjust_lr``, ``direction_preservation`` and ``dp_gamma``. ``beta_max=None`` means the base
    momentum (AdamW beta1 / Muon momentum). Hyperparameters are read from the group at every step.

    Diagnostics of the last step over APT groups: :meth:`diagnostics`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        algorithm_defaults: dict[str, dict[str, Any]],
        update_cos_every: int = 0,
    ) -> None:
        if not isinstance(update_cos_every, int) or update_cos_every < 0:
            raise ValueError(f"update_cos_every={update_cos_every!r} must be an int >= 0")
        self._algorithm_defaults = algorithm_defaults
        self.update_cos_every = update_cos_every
        self._diag: dict[str, list[Tensor]] = {}
        self._diag_step = 0
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        algorithm = param_group.get("algorithm", self.defaults["algorithm"])
        _check_choice("algorithm", algorithm, ALGORITHMS)
        for key, value in self._algorithm_defaults[algorithm].items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("beta_max") is None:
            group["beta_max"] = group["betas"][0] if algorithm == "adamw" else group["momentum"]
        self._validate_group(group)

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        _check_range("lr", group["lr"], 0.0, math.inf)
        _check_range("weight_decay", group["weight_decay"], 0.0, math.inf)
        if group["algorithm"] == "adamw":
            betas = group["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2)")
            _check_range("betas[0]", betas[0], 0.0, 1.0)
            _check_range("betas[1]", betas[1], 0.0, 1.0)
            _check_range("eps", group["eps"], 0.0, math.inf)
        else:
            _check_range("momentum", group["momentum"], 0.0, 1.0)
        _check_range("beta_max", group["beta_max"], 0.0, 1.0)
        _check_range("beta_min", group["beta_min"], 0.0, group["beta_max"], high_open=False)
        _check_choice("beta_map", group["beta_map"], BETA_MAPS)
        _check_choice("granularity", group["granularity"], GRANULARITIES)
        _check_range("cos_eps", group["cos_eps"], 0.0, math.inf)
        if not isinstance(group["apt"], bool):
            raise ValueError(f"apt={group['apt']!r} must be True or False")
        if group["algorithm"] == "adamw":
            return
        steps = group["ns_steps"]
        if not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"ns_steps={steps!r} is out of range: allowed integers [1, 100)")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"ns_coefficients={group['ns_coefficients']!r} must have 3 values")
        _check_range("ns_eps", group["ns_eps"], 0.0, math.inf)
        _check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        _check_choice("adjust_lr", group["adjust_lr"], ADJUST_LR)
        _check_choice(
            "direction_preservation", group["direction_preservation"], DIRECTION_PRESERVATION
        )
        _check_range("dp_gamma", group["dp_gamma"], 0.0, math.inf)
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"Muon groups take >= 2-D parameters; got shape {tuple(p.shape)}: put it in a "
                    "group with algorithm='adamw'"
                )

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._diag = {key: [] for key in _DIAG_KEYS}
        self._diag_step += 1
        want_update_cos = self.update_cos_every > 0 and self._diag_step % self.update_cos_every == 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("APT optimizers support dense real parameters only")
            if group["algorithm"] == "adamw":
                self._adamw_group(group, params, want_update_cos)
            else:
                self._muon_group(group, params, want_update_cos)
        return loss

    def _momentum_betas(
        self, group: dict[str, Any], grads: list[Tensor], moms: list[Tensor], states: list[dict]
    ) -> _Moment:
        """beta_t for the group's tensors: a vector (one per tensor) when the adaptive momentum is
        active, the fixed base beta (a float, so the base optimizer is reproduced exactly) when
        ``apt`` is off or ``beta_min == beta_max``.

        With ``apt`` on, the cosine and the diagnostics are computed even when beta is fixed.
        ||m||^2 lives in ``state["moment_sq"]``, advanced by the EMA recursion; it is measured once
        when missing (first APT step, or state from a run without APT).
        """
        if not group["apt"]:
            return _Moment(group["beta_max"])
        dots = torch.stack(
            [torch.dot(g.reshape(-1), m.reshape(-1)) for g, m in zip(grads, moms, strict=True)]
        )
        g_sq = torch.stack(torch._foreach_norm(grads)).square()
        for st, m in zip(states, moms, strict=True):
            if "moment_sq" not in st:
                st["moment_sq"] = m.float().norm().square()
        m_sq = torch.stack([st["moment_sq"] for st in states])
        dots, g_sq = dots.to(m_sq.dtype), g_sq.to(m_sq.dtype)
        if group["granularity"] == "global":
            c = cosine(dots.sum(), g_sq.sum(), m_sq.sum(), group["cos_eps"]).expand_as(dots)
        else:
            c = cosine(dots, g_sq, m_sq, group["cos_eps"])
        fixed = group["beta_min"] == group["beta_max"]
        beta = (
            torch.full_like(c, group["beta_max"])
            if fixed
            else beta_from_cos(c, group["beta_min"], group["beta_max"], group["beta_map"])
        )
        new_m_sq = ema_sq_norm(m_sq, dots, g_sq, beta)
        for st, value in zip(states, new_m_sq.unbind(), strict=True):
            st["moment_sq"] = value
        self._diag["beta_mean"].append(beta)
        self._diag["beta_min_seen"].append(beta)
        self._diag["cos_mean"].append(c)
        self._diag["instant_share"].append(
            (1.0 - beta) * g_sq.sqrt() / new_m_sq.sqrt().clamp(min=group["cos_eps"])
        )
        return _Moment(group["beta_max"] if fixed else beta, dots, g_sq, new_m_sq)

    def _record_update_cos(self, updates: list[Tensor], grads: list[Tensor]) -> None:
        """cos(-delta theta, g) per tensor, for the ``apt/update_cos`` diagnostic."""
        dots = torch.stack(
            [
                torch.dot(u.reshape(-1).float(), g.reshape(-1).float())
                for u, g in zip(updates, grads, strict=True)
            ]
        )
        norms = (
            torch.stack(torch._foreach_norm(updates)).float()
            * torch.stack(torch._foreach_norm(grads)).float()
        )
        self._diag["update_cos"].append(dots / norms.clamp(min=1e-30))

    def _adamw_group(self, group: dict[str, Any], params: list[Tensor], update_cos: bool) -> None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states, strict=True):
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["bias_prod"] = torch.ones((), dtype=torch.float32, device=p.device)
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta2 = group["betas"][1]
        beta = self._momentum_betas(group, grads, exp_avgs, states).beta
        update_cos = update_cos and group["apt"]
        if update_cos:
            old = [p.detach().clone() for p in params]

        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        bias_prods = [st["bias_prod"] for st in states]
        if isinstance(beta, Tensor):
            torch._foreach_mul_(bias_prods, list(beta.unbind()))
            torch._foreach_lerp_(exp_avgs, grads, list((1.0 - beta).unbind()))
        else:
            torch._foreach_mul_(bias_prods, beta)
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        if lr != 0:
            self._adamw_update(params, exp_avgs, exp_avg_sqs, steps, bias_prods, lr, eps, beta2)
        if update_cos:
            self._record_update_cos(torch._foreach_sub(old, params), grads)

    @staticmethod
    def _adamw_update(
        params: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
        bias_prods: list[Tensor],
        lr: float,
        eps: float,
        beta2: float,
    ) -> None:
        """theta -= lr (m / (1 - P)) / (sqrt(v / bc2) + eps), written as
        theta -= [lr sqrt(bc2) / (1 - P)] * m / (sqrt(v) + eps sqrt(bc2)), bc2 = 1 - beta2^t.

        Tensor by tensor (as torch's single-tensor AdamW): one temporary at a time, which the
        allocator reuses, instead of a model-sized buffer faulted in every step. On CPU the step
        size is a Python number (free to read); elsewhere it stays a device tensor (no sync) and
        scales the denominator.
        """
        bc2_sqrt = [math.sqrt(1.0 - beta2 ** s.item()) for s in steps]
        device = bias_prods[0].device
        step_size = lr * torch.tensor(bc2_sqrt, device=device) / (1.0 - torch.stack(bias_prods))
        on_cpu = device.type == "cpu"
        sizes = step_size.tolist() if on_cpu else (1.0 / step_size).unbind()
        for p, m, v, b, size in zip(params, exp_avgs, exp_avg_sqs, bc2_sqrt, sizes, strict=True):
            denom = v.sqrt().add_(eps * b)
            if on_cpu:
                p.addcdiv_(m, denom, value=-size)
            else:
                p.addcdiv_(m, denom.mul_(size), value=-1.0)

    def _muon_group(self, group: dict[str, Any], params: list[Tensor], update_cos: bool) -> None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states, strict=True):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs = [st["momentum_buffer"] for st in states]
        moment = self._momentum_betas(group, grads, bufs, states)
        n = len(params)
        if isinstance(moment.beta, Tensor):
            betas, one_minus = list(moment.beta.unbind()), list((1.0 - moment.beta).unbind())
        else:
            betas, one_minus = [moment.beta] * n, [1.0 - moment.beta] * n
        lr, wd, nesterov = group["lr"], group["weight_decay"], group["nesterov"]
        dp = group["direction_preservation"] if group["apt"] else "none"
        if dp == "instant":
            # NS normalises its input by the Frobenius norm, so NS(u/||u|| + gamma g/||g||) =
            # NS(u + (gamma ||u|| / ||g||) g): one fused pass, with ||u|| from the scalars.
            beta = moment.beta
            u_sq = moment.m_sq
            if (
                nesterov
            ):  # u = beta B_t + (1 - beta) g, <B_t, g> = beta <B_{t-1}, g> + (1-beta)|g|^2
                u_sq = ema_sq_norm(
                    moment.m_sq, beta * moment.dots + (1 - beta) * moment.g_sq, moment.g_sq, beta
                )
            ratios = list(
                (
                    group["dp_gamma"] * u_sq.sqrt() / moment.g_sq.sqrt().clamp(min=group["cos_eps"])
                ).unbind()
            )
        update_cos = update_cos and group["apt"]
        updates = []
        for i, (p, g, buf) in enumerate(zip(params, grads, bufs, strict=True)):
            buf.lerp_(g, one_minus[i])
            u = g.lerp(buf, betas[i]) if nesterov else buf
            rows = u.shape[0]
            u2, g2 = u.reshape(rows, -1), g.reshape(rows, -1)
            if dp == "instant":  # in place on the nesterov temporary: no new allocation
                u2 = u2.addcmul_(g2, ratios[i]) if nesterov else torch.addcmul(u2, g2, ratios[i])
            elif dp == "row":
                u2 = direction_preservation(u2, g2, "row", group["dp_gamma"])
            ortho = zeropower_via_newtonschulz(
                u2,
                group["ns_steps"],
                tuple(group["ns_coefficients"]),
                group["ns_eps"],
                getattr(torch, group["ns_dtype"]),
            ).reshape(p.shape)
            step = adjusted_lr(lr, group["adjust_lr"], rows, u2.shape[1])
            if update_cos:
                updates.append(ortho.float() * step + p.float() * (lr * wd))
            p.mul_(1.0 - lr * wd)
            p.add_(ortho, alpha=-step)
        if updates:
            self._record_update_cos(updates, grads)

    # ----------------------------------------------------------------- diagnostics
    def diagnostics(self) -> dict[str, float]:
        """Diagnostics of the last step over APT groups (empty when no APT group stepped).

        ``beta_mean`` / ``beta_min_seen``: mean and min of the betas used; ``cos_mean``: mean c_t;
        ``instant_share``: mean (1 - beta_t) ||g_t|| / ||m_t||; ``update_cos``: mean
        cos(-delta theta, g_t), only on steps that are multiples of ``update_cos_every``.
        Reading converts to Python floats (one device sync); stepping never syncs for this.
        """
        out: dict[str, float] = {}
        for key, parts in self._diag.items():
            if not parts:
                continue
            values = torch.cat([x.reshape(-1) for x in parts])
            out[key] = float(values.min() if key == "beta_min_seen" else values.mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["apt_diag_step"] = self._diag_step
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._diag_step = int(state_dict.pop("apt_diag_step", 0))
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; keep the scalar APT buffers fp32.
        for st in self.state.values():
            for key in ("bias_prod", "moment_sq"):
                if key in st and st[key].dtype != torch.float32:
                    st[key] = st[key].float()


def _apt_defaults(
    apt: bool,
    beta_min: float | None,
    beta_max: float | None,
    beta_map: str,
    granularity: str,
    cos_eps: float,
    default_beta_min: float,
) -> dict[str, Any]:
    return {
        "apt": apt,
        "beta_min": default_beta_min if beta_min is None else beta_min,
        "beta_max": beta_max,
        "beta_map": beta_map,
        "granularity": granularity,
        "cos_eps": cos_eps,
    }


class APTAdamW(APTOptimizer):
    """AdamW with APT's adaptive first-moment momentum (apt-hf's reading of arXiv 2604.08939).

    With ``beta_min == beta_max`` (or ``apt=False``) this is AdamW. ``beta_max=None`` means
    ``betas[0]``. A group with ``apt=False`` (e.g. task heads) keeps the fixed beta1.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        apt: bool = True,
        beta_min: float | None = None,
        beta_max: float | None = None,
        beta_map: str = "linear",
        granularity: str = "tensor",
        cos_eps: float = 1e-8,
        update_cos_every: int = 0,
    ) -> None:
        adamw = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            **_apt_defaults(
                apt, beta_min, beta_max, beta_map, granularity, cos_eps, DEFAULT_BETA_MIN_ADAMW
            ),
        }
        defaults = {"algorithm": "adamw", **adamw}
        super().__init__(
            params, defaults, {"adamw": adamw, "muon": adamw}, update_cos_every=update_cos_every
        )


class APTMuon(APTOptimizer):
    """Muon with APT's adaptive momentum and direction preservation, plus AdamW groups.

    Groups default to ``algorithm="muon"`` (>= 2-D weights; 4-D conv weights are flattened to
    (out, in*kh*kw) for Newton-Schulz and the lr adjustment). Groups with ``algorithm="adamw"``
    take the ``adamw_*`` defaults (embeddings, norms, biases, heads). ``beta_max=None`` means the
    group's base momentum. With ``beta_min == beta_max`` and ``direction_preservation="none"``
    the Muon groups are exactly Muon (bit-identical to ``torch.optim.Muon``, which also runs
    Newton-Schulz in bf16). ``ns_dtype="float32"`` gives an exact NS; on this project's CPUs it
    was about 3x slower than bf16.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adjust_lr: str = "original",
        *,
        apt: bool = True,
        beta_min: float | None = None,
        beta_max: float | None = None,
        beta_map: str = "linear",
        granularity: str = "tensor",
        direction_preservation: str = DEFAULT_DIRECTION_PRESERVATION,
        dp_gamma: float = DEFAULT_DP_GAMMA,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        ns_dtype: str = "bfloat16",
        cos_eps: float = 1e-8,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 1e-2,
        adamw_beta_min: float | None = None,
        update_cos_every: int = 0,
    ) -> None:
        muon = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "weight_decay": weight_decay,
            "adjust_lr": adjust_lr,
            "direction_preservation": direction_preservation,
            "dp_gamma": dp_gamma,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_eps": ns_eps,
            "ns_dtype": ns_dtype,
            **_apt_defaults(
                apt, beta_min, beta_max, beta_map, granularity, cos_eps, DEFAULT_BETA_MIN_MUON
            ),
        }
        adamw = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
            **_apt_defaults(
                apt, adamw_beta_min, None, beta_map, granularity, cos_eps, DEFAULT_BETA_MIN_ADAMW
            ),
        }
        super().__init__(
            params,
            {"algorithm": "muon", **muon},
            {"muon": muon, "adamw": adamw},
            update_cos_every=update_cos_every,
        )

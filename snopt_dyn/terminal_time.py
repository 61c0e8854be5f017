"""Training the integration horizon T with a second-order feedback policy (derived below).

Objective ``J(T, θ) = L + (λ/2) T²``.  With ``s = dL/dT`` (exact, from the engine adjoint),
Gauss–Newton gives ``J_T = s + λT``, ``J_TT ≈ s² + λ`` and ``J_Tθ ≈ s ∇_θL``.  Minimising the quadratic
model in ``δT`` for the parameter step ``δθ`` the base optimizer just took gives

    δT = -η (J_T + J_Tθ·δθ) / J_TT      (open loop + feedback)

applied every ``update_freq`` calls with running means of the terms; ``policy="gradient"`` is plain
gradient descent ``δT = -η J_T`` on the same schedule, the first-order baseline.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, List

import torch
from torch import Tensor, nn

TERMINAL_TIME = "terminal_time"


def validate_terminal_time(value) -> float:
    """Reject a non-positive or non-finite horizon with an error that says what to pass."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"terminal_time must be a positive finite number, got {value}; "
                         "pass the horizon T > 0 the model should start from (e.g. 1.0)")
    return value


def attach_terminal_time(module: nn.Module, value) -> None:
    """Give ``module`` a trainable horizon: a float buffer ``terminal_time`` (saved in ``state_dict``,
    not in ``parameters()``, so the base optimizer never moves it)."""
    value = validate_terminal_time(value)
    current = module._buffers.get(TERMINAL_TIME)
    if isinstance(current, Tensor):
        current.fill_(value)
    else:
        like = next((p for p in module.parameters() if p.is_floating_point()), None)
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        device = like.device if like is not None else None
        module.register_buffer(TERMINAL_TIME, torch.tensor(value, dtype=dtype, device=device))


def terminal_time_leaf(module: nn.Module) -> Tensor:
    """A fresh leaf equal to ``module.terminal_time`` whose gradient accumulates into
    ``module.terminal_time.grad`` (a buffer survives ``.to()``/``.double()``, a graph would not)."""
    value = float(module._buffers[TERMINAL_TIME])
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"terminal_time became {value}; it must stay positive and finite "
                         "(lower TerminalTimeOptimizer's lr or raise t_min)")
    leaf = module._buffers[TERMINAL_TIME].detach().clone().requires_grad_(True)

    def accumulate(grad: Tensor) -> None:
        buf = module._buffers[TERMINAL_TIME]
        buf.grad = grad.detach().clone() if buf.grad is None else buf.grad + grad.detach()

    leaf.register_hook(accumulate)
    return leaf


def rescale_to_horizon(t: Tensor, horizon: Tensor) -> Tensor:
    """Stretch the grid ``t`` so that it runs from ``t[0]`` to ``t[0] + horizon`` (differentiably in T)."""
    start = t[0].detach()
    span = t[-1].detach() - start
    return start + (t.detach() - start) * (horizon.to(t.dtype) / span)


def terminal_times(model: nn.Module) -> Dict[str, Tensor]:
    """The trainable horizons of a wrapped model, by module name (``terminal_time`` buffers)."""
    return {name: module._buffers[TERMINAL_TIME] for name, module in _horizon_modules(model).items()}


def _horizon_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module._buffers.get(TERMINAL_TIME), Tensor)}


class TerminalTimeOptimizer:
    """Updates every trainable horizon of ``model`` (made by ``snopt_dyn.wrap(..., train_terminal_time=True)``).

    Call :meth:`step` after the base optimizer's step; it reads ``T.grad`` (filled by the engine
    adjoint during ``backward()``), the raw parameter gradients (copied by a hook as ``backward()``
    accumulates them, before any preconditioner rewrites ``.grad``) and the step ``δθ`` the base
    optimizer actually took, then zeroes ``T.grad``.

    Args:
        model: the wrapped model.
        lr: η, the step scale.
        reg: λ, the weight of the ``(λ/2)T²`` penalty that prefers short (cheap) horizons.
        update_freq: K, apply a T update every K calls (running means in between).
        policy: ``"feedback"`` (second order, open loop + feedback) or ``"gradient"`` (first order).
        t_min: lower bound on T.
        momentum: running-mean weight of ``J_T``, ``J_TT`` and the feedback term.
    """

    def __init__(self, model: nn.Module, *, lr: float = 0.1, reg: float = 1e-3, update_freq: int = 50,
                 policy: str = "feedback", t_min: float = 0.1, momentum: float = 0.99):
        if policy not in ("feedback", "gradient"):
            raise ValueError(f"policy must be 'feedback' or 'gradient', got {policy!r}")
        if update_freq < 1:
            raise ValueError(f"update_freq must be a positive integer, got {update_freq}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        validate_terminal_time(t_min)
        self._modules = _horizon_modules(model)  # buffers are looked up per step: .to() replaces them
        if not self._modules:
            raise ValueError("the model has no trainable horizon: wrap it with "
                             "snopt_dyn.wrap(model, train_terminal_time=True) first")
        self.params: List[Tensor] = [p for p in model.parameters() if p.requires_grad]
        # the feedback needs the raw gradient ∇_θL; a preconditioner may rewrite .grad before step()
        self._raw: Dict[int, Tensor] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(_RawGrad(self, i)) for i, p in enumerate(self.params)]
        self.lr, self.reg, self.update_freq = lr, reg, update_freq
        self.policy, self.t_min, self.momentum = policy, t_min, momentum
        self.calls = 0
        self._previous = [p.detach().clone() for p in self.params]
        self._stats = {name: torch.zeros(3, dtype=torch.float64) for name in self._modules}  # J_T, J_TT, feedback
        self._weight = 0.0  # running-mean normaliser (bias correction)
        self.history: Dict[str, List[float]] = {name: [float(t)] for name, t in self.horizons.items()}

    @property
    def horizons(self) -> Dict[str, Tensor]:
        """The current ``terminal_time`` buffers, by module name."""
        return {name: m._buffers[TERMINAL_TIME] for name, m in self._modules.items()}

    @torch.no_grad()
    def step(self) -> None:
        """Accumulate this iteration's terms; every ``update_freq`` calls move each T."""
        directional = 0.0  # ∇_θL · δθ for the step the base optimizer just took
        for i, (p, prev) in enumerate(zip(self.params, self._previous)):
            grad = self._raw.get(i, p.grad)
            if grad is not None:
                directional += float((grad.double() * (p.detach().double() - prev.double())).sum())
            prev.copy_(p.detach())
        self._raw.clear()
        m = self.momentum
        self._weight = m * self._weight + (1 - m)
        for name, T in self.horizons.items():
            s = 0.0 if T.grad is None else float(T.grad)
            if not math.isfinite(s):
                T.grad = None
                continue
            terms = torch.tensor([s + self.reg * float(T), s * s + self.reg, s * directional], dtype=torch.float64)
            self._stats[name].mul_(m).add_((1 - m) * terms)
            T.grad = None
        self.calls += 1
        if self.calls % self.update_freq:
            return
        for name, T in self.horizons.items():
            j_t, j_tt, feedback = (self._stats[name] / self._weight).tolist()
            if self.policy == "feedback":
                delta = -self.lr * (j_t + feedback) / j_tt
            else:
                delta = -self.lr * j_t
            T.copy_(torch.clamp(T + delta, min=self.t_min))
            self.history[name].append(float(T))

    def remove(self) -> None:
        """Remove the gradient hooks this optimizer put on the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        return {"calls": self.calls, "weight": self._weight,
                "stats": {k: v.clone() for k, v in self._stats.items()},
                "previous": [p.clone() for p in self._previous],
                "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self._weight = int(state["calls"]), float(state["weight"])
        self._stats = {k: v.clone() for k, v in state["stats"].items()}
        for p, q in zip(self._previous, state["previous"]):
            p.copy_(q)
        self.history = {k: list(v) for k, v in state["history"].items()}


class _RawGrad:
    """Post-accumulate-grad hook keeping a copy of the raw gradient (holds the optimizer weakly)."""

    def __init__(self, owner: TerminalTimeOptimizer, index: int):
        self._ref, self.index = weakref.ref(owner), index

    def __call__(self, param: Tensor) -> None:
        owner = self._ref()
        if owner is not None and param.grad is not None:
            owner._raw[self.index] = param.grad.detach().clone()

    def __getstate__(self):  # a pickled model keeps an inert hook
        return {"index": self.index}

    def __setstate__(self, state):
        self.index, self._ref = state["index"], lambda: None

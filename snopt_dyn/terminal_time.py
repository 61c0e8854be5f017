"""Training the integration horizon T with a second-order feedback policy (DESIGN.md §2.5).

Objective ``J(T, θ) = L + (λ/2) T²``.  With ``s = dL/dT`` (exact, from the engine adjoint),
Gauss–Newton gives ``J_T = s + λT``, ``J_TT ≈ s² + λ`` and ``J_Tθ ≈ s ∇_θL``.  Minimising the quadratic
model in ``δT`` for the parameter step ``δθ`` the base optimizer just took gives

    δT = -η (J_T + J_Tθ·δθ) / J_TT      (open loop + feedback)

applied every ``update_freq`` calls with running means of the terms; ``policy="gradient"`` is plain
gradient descent ``δT = -η J_T`` on the same schedule, the first-order baseline.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

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


def terminal_times(model: nn.Module) -> Dict[str, Tensor]:
    """The trainable horizons of a wrapped model, by module name (``terminal_time`` buffers)."""
    found = {}
    for name, module in model.named_modules():
        t = getattr(module, TERMINAL_TIME, None)
        if isinstance(t, Tensor) and t.requires_grad:
            found[name] = t
    return found


class TerminalTimeOptimizer:
    """Updates every trainable horizon of ``model`` (made by ``snopt_dyn.wrap(..., train_terminal_time=True)``).

    Call :meth:`step` after the base optimizer's step; it reads ``T.grad`` (filled by the engine
    adjoint during ``backward()``), the parameter gradients and the step ``δθ`` the base optimizer
    actually took, then zeroes ``T.grad``.

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
        self.horizons = terminal_times(model)
        if not self.horizons:
            raise ValueError("the model has no trainable horizon: wrap it with "
                             "snopt_dyn.wrap(model, train_terminal_time=True) first")
        self.params: List[Tensor] = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.reg, self.update_freq = lr, reg, update_freq
        self.policy, self.t_min, self.momentum = policy, t_min, momentum
        self.calls = 0
        self._previous = [p.detach().clone() for p in self.params]
        self._stats = {name: torch.zeros(3, dtype=torch.float64) for name in self.horizons}  # J_T, J_TT, feedback
        self._weight = 0.0  # running-mean normaliser (bias correction)
        self.history: Dict[str, List[float]] = {name: [float(t.detach())] for name, t in self.horizons.items()}

    @torch.no_grad()
    def step(self) -> None:
        """Accumulate this iteration's terms; every ``update_freq`` calls move each T."""
        directional = 0.0  # ∇_θL · δθ for the step the base optimizer just took
        for p, prev in zip(self.params, self._previous):
            if p.grad is not None:
                directional += float((p.grad.double() * (p.detach().double() - prev.double())).sum())
            prev.copy_(p.detach())
        m = self.momentum
        self._weight = m * self._weight + (1 - m)
        for name, T in self.horizons.items():
            s = 0.0 if T.grad is None else float(T.grad)
            if not math.isfinite(s):
                T.grad = None
                continue
            terms = torch.tensor([s + self.reg * float(T.detach()), s * s + self.reg, s * directional], dtype=torch.float64)
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
            self.history[name].append(float(T.detach()))

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

"""The KL clip: a trust region on the preconditioned step (Ba, Grosse & Martens 2017, as in K-FAC).

A second-order step can be far longer than the gradient step where the curvature estimate is small
(just after a refresh, or late in training when gradients shrink).  With ``kl_clip = c`` every
preconditioned gradient ``p`` is scaled by ``ν = min(1, sqrt(c / (η² Σ_layers ⟨p, g⟩)))``, ``g`` the
raw gradient and ``η`` the base optimizer's learning rate.  With ``p = F⁻¹g``, ``η² ⟨p, g⟩ = η² pᵀFp``
is twice the KL divergence (to second order) between the model's outputs before and after the
step; after the clip ``η² (νp)ᵀF(νp) = ν² η² ⟨p, g⟩ ≤ c``.
``ν`` stays a tensor, so the clip costs no host synchronisation.
"""
from __future__ import annotations

import math
from typing import Callable, List, Union

import torch
from torch import Tensor

LearningRate = Union[float, Callable[[int], float], torch.optim.Optimizer]


def check(kl_clip, lr) -> None:
    """``ValueError`` naming the fix for a clip without a usable learning rate."""
    if kl_clip is None:
        return
    if not (isinstance(kl_clip, (int, float)) and not isinstance(kl_clip, bool) and kl_clip > 0
            and math.isfinite(kl_clip)):
        raise ValueError(f"SNOpt: kl_clip must be a finite number > 0 (K-FAC uses 1e-3), got {kl_clip!r}")
    if lr is None:
        raise ValueError("SNOpt: kl_clip needs the base optimizer's learning rate: pass lr=optimizer "
                         "(read at every step, so schedules are followed), a number or a function of the step")
    if not (isinstance(lr, torch.optim.Optimizer) or callable(lr) or isinstance(lr, (int, float))):
        raise TypeError(f"SNOpt: lr must be a torch optimizer, a number or a callable, got {type(lr).__name__}")


def current_lr(lr: LearningRate, step: int) -> float:
    """The learning rate now: the first parameter group's of an optimizer, or ``lr(step)``, or ``lr``."""
    if isinstance(lr, torch.optim.Optimizer):
        return float(lr.param_groups[0]["lr"])
    return float(lr(step)) if callable(lr) else float(lr)


def scale(raw: List[Tensor], new: List[Tensor], kl_clip: float, lr: float) -> Tensor:
    """``ν`` for raw gradients ``raw`` and their preconditioned ``new`` (a 0-dim tensor, ≤ 1)."""
    device = new[0].device
    vg = sum((p * g.to(p.dtype)).sum().to(device, torch.float64) for p, g in zip(new, raw))
    vg = vg.abs() * lr * lr
    return torch.sqrt(kl_clip / vg.clamp_min(1e-300)).clamp(max=1.0)

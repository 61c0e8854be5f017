"""Control paths for Neural CDEs: torchcde's Hermite cubic spline built on each series' own steps.

Why per series: a spline through padded series is not flat on the first padded interval.  Backward
differences carry the last slope into it, a bump that moves the CDE state and makes the time
channel run backwards (its derivative reached -0.012 on JapaneseVowels).  Built on a series' own
steps and then held constant, the path stops at the series' end (``dX = 0``): the state at the
common final time equals the state at the series' own end, and padding cannot change an output.

torchcde is imported on first use (it is an optional dependency of the package).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..optional import require

__all__ = ["hermite_coefficients"]


def _torchcde():
    return require("torchcde", "a Neural CDE control path", "torchcde")


def hermite_coefficients(x: Tensor, lengths: Tensor) -> Tensor:
    """Coefficients ``(n, L - 1, 4 C)`` of torchcde's Hermite cubic spline with backward differences.

    Args:
        x: ``(n, L, C)`` series padded to a common length ``L`` (what lies after a series' end is
            ignored); ``NaN`` marks missing values, as torchcde expects.
        lengths: ``(n,)`` number of steps of each series.  Each series' spline uses its first
            ``lengths[i]`` steps; after them the pieces are constant at the path's end value.
    """
    lengths = lengths.to("cpu").clamp(min=2)
    if x.shape[1] < 2:
        x = torch.cat([x, x], dim=1)  # a single step: a constant path over one interval
    out = x.new_zeros(x.shape[0], x.shape[1] - 1, 4 * x.shape[2])
    for length in torch.unique(lengths).tolist():
        rows = torch.nonzero(lengths == length).flatten().to(x.device)
        out[rows] = _held_after_end(x[rows, :length], x.shape[1])
    return out


def _held_after_end(x: Tensor, total: int) -> Tensor:
    """Coefficients of equal-length series ``x`` ``(k, L, C)``, then constant pieces up to ``total`` knots."""
    cde = _torchcde()
    coeffs = cde.hermite_cubic_coefficients_with_backward_differences(x)
    if x.shape[1] == total:
        return coeffs
    end = cde.CubicSpline(coeffs).evaluate(coeffs.new_tensor(float(x.shape[1] - 1)))  # (k, C), NaN filled
    flat = torch.cat([end, torch.zeros_like(end).repeat(1, 3)], dim=-1)
    return torch.cat([coeffs, flat.unsqueeze(1).expand(-1, total - x.shape[1], -1)], dim=1)

"""Learning-rate schedules as functions of the fraction of a training budget spent.

Why a module of its own: the main job (``snopt_dyn.compare``) and the scikit-learn estimators apply
the same warm-up + cosine decay, and neither may import the other.
"""
from __future__ import annotations

import math

__all__ = ["WARMUP", "SCHEDULES", "warmup_cosine"]

#: the fraction of the budget over which the rate rises linearly to its full value
WARMUP = 0.05
#: the schedules the main job's ``schedule=`` and the estimators' ``schedule`` accept
SCHEDULES = ("constant", "cosine")


def warmup_cosine(progress: float) -> float:
    """The learning-rate multiplier at ``progress`` (0 = start, 1 = budget spent; clipped to [0, 1]):
    a linear warm-up over :data:`WARMUP` (from 1e-3 / WARMUP, never 0), then a cosine decay to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < WARMUP:
        return (progress + 1e-3) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (progress - WARMUP) / (1 - WARMUP)))

"""The Kronecker factors as a running average across refreshes instead of one batch's.

By default (``factor_ema=0``) each refresh rebuilds ``A`` and ``G`` from its own batch alone: J time
samples of one mini-batch, every 20-50 iterations.  Every reference implementation averages its
factors instead (kfac-jax ``curvature_ema=0.95``, kfac-pytorch ``factor_decay=0.95``, SOAP's
``shampoo_beta``), and Zhang et al. (NeurIPS 2019) find that averaging lowers the steady-state risk,
most at small batch.  Here the image task's refresh batch is 64 samples x 4 times, and refreshing
more often changed nothing (BENCHMARKS §4): a sign of noise in the estimate rather than staleness.

With ``factor_ema = λ`` the average is ``Σ_k λ^(n-k) F_k / Σ_k λ^(n-k)`` over the refreshes
``k <= n``: normalised by its total weight (bias-corrected, like kfac-jax's
``WeightedMovingAverage``), so the first refresh is its own batch and no identity prior is needed.
The burn-in batches (:mod:`.burn_in`) enter with equal weight (``λ = 1``).  ``mult`` (samples x
locations per sample) is averaged with the same weights.  The cross-rank average
(:mod:`.distributed`) comes first, so every rank holds the same running average.
"""
from __future__ import annotations

from typing import Optional, Tuple, TypeVar

T = TypeVar("T")


def blend(old: Optional[T], weight: float, new: T, decay: float) -> Tuple[T, float]:
    """``(average, its total weight)`` after adding ``new`` to ``old`` (total weight ``weight``)
    with the old terms discounted by ``decay``; ``decay = 0`` returns ``new`` itself (today's rule)."""
    if old is None or decay == 0 or weight == 0:
        return new, 1.0
    w = decay * weight
    return (old * w + new) / (w + 1), w + 1

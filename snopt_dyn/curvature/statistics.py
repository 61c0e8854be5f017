"""Per-layer statistics of one refresh iteration, and **how G is scaled** (all of it is here).

Target: the per-sample empirical Fisher ``F = mean_b p_b p_bᵀ`` of a layer, where ``p_b`` is the
gradient of sample ``b``'s own loss (the per-sample Fisher; docs/ARCHITECTURE.md).  Each *use* of the layer (one sampled
field evaluation at time ``t_j``, or one ordinary forward call of a static layer) gives input rows
``x̄`` and output-gradient rows ``g`` of the loss the user back-propagated.  The output rows are
rescaled to the per-sample loss by :func:`output_scale`:

* ``loss_reduction="mean"``: the loss is a batch mean, so ``g`` carries a factor ``1/N``; multiply
  by the solve's batch size ``N``.  With ``K`` gradient-accumulation micro-batches (``loss / K``
  each, ``K`` backward passes before one ``step()``) the effective batch is ``K·N``: G gets a
  further ``K²`` in :meth:`LayerStats.finalize` (``K`` = distinct backward passes seen).
* ``loss_reduction="sum"``: ``g`` is already per-sample; no factor (and no ``K``).  Then the
  gradient is ``B`` (the batch size) times the mean loss's while the curvature is the same
  per-sample one, so every preconditioned gradient is exactly ``B`` times the ``"mean"`` one.
* a sampled use also carries the quadrature weight ``w_j`` of its time (``p_b = Σ_j w_j g x̄ᵀ``).

Kronecker factors: ``A = mean over (uses, samples) of mean-over-rows x̄x̄ᵀ``, ``G`` likewise of
``ĝĝᵀ``, and ``F ≈ mult · A ⊗ G`` with ``mult`` = rows per sample summed over the uses of one
sample (J samples × locations for one solve; not multiplied by ``K``).  For the per-sample second
moment (true EKFAC) the per-sample gradients ``p_b`` themselves are summed over the uses of each
backward pass (:attr:`LayerStats.per_sample`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

Number = Union[float, Tensor]


def output_scale(reduction: str, batch: int, weight: Number = 1.0) -> Number:
    """The factor turning one use's output gradient into the per-sample one (see module notes)."""
    return (batch if reduction == "mean" else 1) * weight


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors, eigenbases and moments are kept in at least float32 (bf16/fp16 models)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Factors:
    """What a refresh hands to the maths: ``F ≈ mult · A ⊗ G`` at per-sample scale."""

    a: Tensor
    g: Tensor
    mult: float
    batch: float  # the effective batch of the step on this rank (K·N)
    samples: int  # weight of this rank's statistics in a cross-rank average
    per_sample: List[Tensor]  # (n, d_out, d_in) per-sample gradients, one tensor per backward pass


class LayerStats:
    """Accumulates the uses of one layer during one refresh iteration."""

    def __init__(self, keep_per_sample: bool):
        self.a_sum: Optional[Tensor] = None
        self.g_sum: Optional[Tensor] = None
        self.samples = 0  # Σ over uses of the samples each use serves
        self.uses = 0
        self.evaluations: set = set()  # sampling evaluations that gave this layer a use
        self.rows = 0  # Σ over uses of rows per sample
        self.passes: set = set()
        self.keep_per_sample = keep_per_sample
        self.per_sample: Dict[Tuple[int, int], Tensor] = {}
        self.disconnected = 0  # uses whose output did not reach the field's value

    def add(self, x: Tensor, g: Tensor, pass_id: int, evaluation: Optional[int] = None) -> None:
        """One use: ``x`` ``(n or 1, L, d_in)`` input rows, ``g`` ``(n or 1, L, d_out)`` output rows
        at per-sample scale (a side with one leading entry serves all ``n`` samples).  ``evaluation``:
        the sampling evaluation it came from (several uses may share one)."""
        n, rows = max(x.shape[0], g.shape[0]), g.shape[1]
        xr, gr = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        a = (xr.t() @ xr) * (n / xr.shape[0])
        gg = (gr.t() @ gr) * (n / gr.shape[0])
        self.a_sum = a if self.a_sum is None else self.a_sum + a
        self.g_sum = gg if self.g_sum is None else self.g_sum + gg
        self.samples += n
        self.uses += 1
        if evaluation is not None:
            self.evaluations.add(evaluation)
        self.rows += rows
        self.passes.add(pass_id)
        if self.keep_per_sample:
            p = torch.einsum("nlo,nli->noi", g.expand(n, -1, -1), x.expand(n, -1, -1))
            key = (pass_id, n)
            self.per_sample[key] = p if key not in self.per_sample else self.per_sample[key] + p

    def finalize(self, reduction: str) -> Optional[Factors]:
        """The factors of the refresh, or ``None`` when the layer had no use."""
        if not self.uses:
            return None
        k = max(1, len(self.passes))
        fix = k if reduction == "mean" else 1  # micro-batches: the effective batch is k·N
        return Factors(a=self.a_sum / self.samples, g=self.g_sum * (fix * fix / self.samples),
                       mult=self.rows / k, batch=self.samples / self.uses * k, samples=self.samples,
                       per_sample=[p * fix for p in self.per_sample.values()])

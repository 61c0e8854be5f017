"""The eigenvalue-corrected Kronecker update (docs/ARCHITECTURE.md, step 5) and its second moment ``m2``.

Refresh: ``A = U_A diag(s_A) U_Aᵀ``, ``G = U_G diag(s_G) U_Gᵀ``.  The second moment of the
per-sample gradients in that eigenbasis, ``m2``, starts from one of three rules (``moment=``):

* ``"per_sample"`` (true EKFAC, George et al. 2018): ``m2 = mean_b (U_Gᵀ p_b U_A)²`` from the
  per-sample gradients ``p_b`` of the refresh iteration, held until the next refresh;
* ``"paper"`` (the SNOpt code): ``m2 = mult · s_G s_Aᵀ`` at the refresh, then every step
  ``m2 ← α m2 + (1-α) B (U_Gᵀ ḡ U_A)²`` with ``ḡ`` the batch-mean gradient and ``B`` the batch;
* ``"kfac"``: ``m2 = mult · s_G s_Aᵀ`` held fixed (the damped K-FAC inverse in its eigenbasis).

Every step: ``grad ← U_G ((U_Gᵀ grad U_A) ⊘ (m2 + ε)) U_Aᵀ``.  This is ``SNOpt(rule="ekfac")``, the
default; :mod:`.eigen_adam` is the Adam rule, which reproduces this one bit for bit at ``power=1``,
``beta1=0``, ``moment="paper"`` without bias correction.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

MOMENTS = ("per_sample", "paper", "kfac")


def eigh(mat: Tensor, name: str) -> Tuple[Tensor, Tensor]:
    """Eigendecomposition in float64, retried with growing jitter instead of crashing."""
    m = mat.double()
    m = (m + m.t()) / 2
    for attempt in range(5):
        try:
            jitter = 0.0 if attempt == 0 else float(m.diagonal().abs().mean() or 1.0) * 10.0 ** (attempt - 7)
            s, u = torch.linalg.eigh(m + jitter * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
            return s.clamp_min(0).to(mat.dtype), u.to(mat.dtype)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
    raise RuntimeError(f"eigendecomposition of a factor of layer {name!r} failed even with jitter")


def kronecker_moment(s_g: Tensor, s_a: Tensor, mult: float) -> Tensor:
    """``mult · s_G s_Aᵀ``: the diagonal of ``mult · A ⊗ G`` in its eigenbasis."""
    return mult * torch.outer(s_g, s_a)


def per_sample_sums(u_g: Tensor, u_a: Tensor, grads: List[Tensor]) -> Tuple[Tensor, int]:
    """``Σ_b (U_Gᵀ p_b U_A)²`` over the per-sample gradients, and the number of samples."""
    total = u_g.new_zeros(u_g.shape[0], u_a.shape[0])
    count = 0
    for p in grads:
        proj = u_g.t() @ p.to(u_g.dtype) @ u_a
        total = total + (proj * proj).sum(0)
        count += p.shape[0]
    return total, count


def precondition(grad: Tensor, u_g: Tensor, u_a: Tensor, m2: Tensor, damping: float,
                 running: Tuple[float, float, float] = None) -> Tensor:
    """The preconditioned ``[∇W | ∇b]``; ``running = (alpha, batch, mean_factor)`` updates ``m2`` in
    place by the paper's rule, with ``ḡ = grad / mean_factor`` (1 for a mean loss, B for a sum)."""
    proj = u_g.t() @ grad @ u_a
    if running is not None:
        alpha, batch, mean_factor = running
        mean_proj = proj / mean_factor
        m2.mul_(alpha).add_((1 - alpha) * batch * mean_proj * mean_proj)
    return u_g @ (proj / (m2 + damping)) @ u_a.t()

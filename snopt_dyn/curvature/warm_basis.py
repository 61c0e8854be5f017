"""A cheap basis update between full eigendecompositions: one power iteration + QR, warm-started.

SOAP computes one ``eigh`` and then refreshes its basis by a single step of subspace iteration from
the current basis (``get_orthogonal_matrix_qr`` in pytorch-optimizer's and nikhilvyas' ``soap.py``):
the stored factor ``F`` times the current basis ``U``, columns ordered by the estimated eigenvalues
``diag(Uᵀ F U)`` (largest first, so Gram-Schmidt keeps the best-converged directions), then QR.  When
the factors drift slowly (an averaged factor, :mod:`.factor_average`) one such step keeps the basis
close to the eigenbasis at the cost of a matmul and a QR instead of an ``eigh``; "Purifying Shampoo"
(Eschenhagen et al. 2025) shows a stale basis stays usable when the eigenvalues are corrected, which
the rules here do every step.

Returned like :func:`.ekfac.eigh`: eigenvalue estimates ``diag(Qᵀ F Q)`` (clamped at 0) in ascending
order and the new orthonormal basis.  Columns may come back permuted or sign-flipped relative to the
old basis; :mod:`.basis_change` carries the moments across that exactly.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def power_qr(mat: Tensor, basis: Tensor) -> Tuple[Tensor, Tensor]:
    """One power iteration of ``mat`` from ``basis`` and a QR, in float64; ``(eigenvalues, basis)``."""
    m = mat.double()
    m = (m + m.t()) / 2
    u = basis.double()
    mu = m @ u
    estimate = (u * mu).sum(0)
    q, _ = torch.linalg.qr(mu[:, torch.argsort(estimate, descending=True)])
    q = q.flip(1)  # ascending, as eigh returns them
    s = (q * (m @ q)).sum(0).clamp_min(0)
    return s.to(mat.dtype), q.to(mat.dtype)

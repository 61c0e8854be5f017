"""Carrying the moments held in an eigenbasis into a new basis at a rebuild.

A moment stored in the eigenbasis is only meaningful together with the basis it was taken in; a rule
that keeps it across a rebuild must move it (HomebrewML/HeavyBall issue 42: an Adam first moment
left un-projected; NVIDIA-NeMo/Emerging-Optimizers PR 300: a second moment that did not follow the
QR's column sort).  With ``R_G = U_G,newᵀ U_G,old`` and ``R_A = U_A,newᵀ U_A,old`` (an absent basis is
the identity: no basis yet, as in burn-in):

* first moment (a rotated gradient): rotate it out of the old basis and into the new one,
  ``M_new = U_G,newᵀ (U_G,old M U_A,oldᵀ) U_A,new = R_G M R_Aᵀ``, exact;
* second moment ``v`` (the diagonal, in the old basis, of the gradient's second-moment matrix
  ``C = Σ_kl v_kl e_kl e_klᵀ`` with ``e_kl = u_A,l ⊗ u_G,k``): the diagonal of the same ``C`` in the
  new basis, ``v_new[i, j] = Σ_kl R_G[i, k]² v[k, l] R_A[j, l]²``, i.e.
  ``(R_G ∘ R_G) v (R_A ∘ R_A)ᵀ``.

SOAP (pytorch-optimizer's ``soap.py``) keeps its first moment in the parameter space and projects it
with the current basis at every step, which is the same as the exact rotation above; its second
moment is only *re-ordered* (``index_select`` by the sort of the estimated eigenvalues) when its QR
step refreshes the basis, because one power iteration moves the basis little.  A rebuild here may be
a full ``eigh`` of a new batch's factors, so the basis can move far; the squared-overlap map above
reduces to SOAP's re-ordering when the new basis is a permutation (with any signs) of the old one,
keeps ``v`` unchanged when the basis is unchanged, and otherwise gives the best diagonal description
of the old second moment in the new basis (it preserves the total ``Σ v``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def rotation(new: Optional[Tensor], old: Optional[Tensor]) -> Optional[Tensor]:
    """``newᵀ old`` (either may be ``None``, the identity); ``None`` when both are."""
    if new is None:
        return None if old is None else old
    return new.t() if old is None else new.t() @ old.to(new.dtype)


def carry_first(m: Tensor, r_g: Optional[Tensor], r_a: Optional[Tensor]) -> Tensor:
    """``R_G m R_Aᵀ`` (an identity side is skipped)."""
    if r_g is not None:
        m = r_g.to(m.dtype) @ m
    if r_a is not None:
        m = m @ r_a.to(m.dtype).t()
    return m


def carry_second(v: Tensor, r_g: Optional[Tensor], r_a: Optional[Tensor]) -> Tensor:
    """``(R_G ∘ R_G) v (R_A ∘ R_A)ᵀ``: the diagonal of the same second-moment matrix in the new basis."""
    return carry_first(v, None if r_g is None else r_g * r_g, None if r_a is None else r_a * r_a)

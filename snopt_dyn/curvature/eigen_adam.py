"""Adam in the time-sampled Kronecker eigenbasis (``SNOpt(rule="adam")``).

Today's rule (:mod:`.ekfac`) divides the rotated gradient by a running *empirical-Fisher* moment
``B·ḡ²`` (power -1) with no momentum.  Once gradients shrink that step grows towards ``1/ε``
(Kunstner et al., NeurIPS 2019; |Pg|/|g| reached 13-14 late in training here).  SOAP (Vyas et al.,
ICLR 2025) and StEVE run Adam in a Kronecker eigenbasis instead and beat Shampoo, Adam and EKFAC;
SOAP's paper shows that updating the second moment every step between basis refreshes removes most
of the cost of infrequent eigendecompositions.  With ``P = U_Gᵀ g U_A`` the rotated gradient:

    m ← β1 m + (1-β1) P                       (first moment, in the gradient's own scale)
    v ← β2 v + (1-β2) P̄⊙P̄                     (``moment="adam"``: P̄ = P of the batch-mean loss)
    update = U_G (m̂ ⊘ (v̂^p + ε)) U_Aᵀ,  m̂ = m/(1-β1^t), v̂ = v/(1-β2^t)  (bias correction, per layer)

* ``p`` (``power``) in [1/2, 1]: 1/2 is Adam's scale-free step; 1 keeps today's power.
* ``relative_eps`` δ adds ``δ·mean(v̂^p)`` (per layer) to the denominator.  Adam's step is about
  ``±lr`` in *every* coordinate early on, and in a Kronecker eigenbasis many coordinates carry almost
  no gradient (14-37 % of them on the Neural CDE's first step, against 6-13 % of the weights).  An
  absolute ε cannot tell them apart without losing scale invariance; ``δ·mean`` damps them and stays
  scale-free.  Default 0: at 0.3 it lost 6-11 points on two of three held-out UCR sets (BENCHMARKS.md §6).
* ``moment="adam"``: ``v`` starts at 0 and is carried into every new basis (:mod:`.basis_change`),
  as SOAP does.  ``moment="paper"``: ``v`` is today's rule: reset at every rebuild to the Kronecker
  eigenvalues ``mult·s_G s_Aᵀ`` and updated with ``α`` and ``B·P̄⊙P̄`` (not bias-corrected: it does not
  start at 0).  With ``moment="paper"``, ``p = 1``, ``β1 = 0``, no bias correction and ``ε`` =
  ``damping`` this is :func:`.ekfac.precondition` operation for operation (bit for bit).
* ``m`` is kept in the raw gradient's scale and ``v`` in the mean loss's, so with
  ``loss_reduction="sum"`` every update is ``B`` times the mean loss's, as for today's rule.
* With the identity basis (``U = None``: burn-in, or a layer without statistics) this is
  ``torch.optim.Adam``'s update; SNOpt writes it into ``.grad`` and plain SGD at rate ``lr`` takes
  Adam's step (weight decay: :mod:`.weight_decay`).

``m`` is ``None`` when ``β1 = 0`` (no state: ``m = P``).  Nothing here reads a tensor on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

#: How ``v`` is formed under ``rule="adam"`` (see the module notes).
MOMENTS = ("adam", "paper")


@dataclass(frozen=True)
class Hyper:
    """The rule's numbers for one step (``alpha`` and ``eps`` may follow schedules)."""

    beta1: float
    beta2: float
    eps: float
    power: float
    bias_correction: bool
    moment: str
    alpha: float
    relative_eps: float = 0.0


def rotate_in(grad: Tensor, u_g: Optional[Tensor], u_a: Optional[Tensor]) -> Tensor:
    """``U_Gᵀ grad U_A`` (``grad`` itself in the identity basis)."""
    return grad if u_g is None else u_g.t() @ grad @ u_a


def rotate_out(x: Tensor, u_g: Optional[Tensor], u_a: Optional[Tensor]) -> Tensor:
    """``U_G x U_Aᵀ`` (``x`` itself in the identity basis)."""
    return x if u_g is None else u_g @ x @ u_a.t()


def update_second(v: Tensor, mean_proj: Tensor, hp: Hyper, batch: float) -> None:
    """``v`` in place: Adam's EMA of ``P̄²``, or the paper's ``α v + (1-α) B P̄²`` (as in :mod:`.ekfac`)."""
    if hp.moment == "paper":
        v.mul_(hp.alpha).add_((1 - hp.alpha) * batch * mean_proj * mean_proj)
    else:
        v.mul_(hp.beta2).add_((1 - hp.beta2) * mean_proj * mean_proj)


def update_first(m: Optional[Tensor], proj: Tensor, beta1: float) -> Tensor:
    """``m`` in place (EMA of ``P``), or ``P`` itself when there is no first moment (``β1 = 0``)."""
    if m is None:
        return proj
    return m.mul_(beta1).add_((1 - beta1) * proj)


def debiased(m: Tensor, v: Tensor, hp: Hyper, t: int):
    """``(m̂, v̂)``: bias-corrected where the moment started at zero (``t`` counts this step)."""
    if not hp.bias_correction:
        return m, v
    if hp.beta1 > 0:
        m = m / (1 - hp.beta1 ** t)
    if hp.moment == "adam":
        v = v / (1 - hp.beta2 ** t)
    return m, v


def denominator(v: Tensor, power: float, eps: float, relative_eps: float = 0.0) -> Tensor:
    """``v^p + ε (+ δ·mean(v^p))`` (p = 1 and 1/2 exactly as today's rule and Adam write them)."""
    scaled = v if power == 1 else v.sqrt() if power == 0.5 else v.pow(power)
    if relative_eps:
        return scaled + (eps + relative_eps * scaled.mean())
    return scaled + eps


def precondition(grad: Tensor, u_g: Optional[Tensor], u_a: Optional[Tensor], m: Optional[Tensor], v: Tensor,
                 t: int, hp: Hyper, batch: float, mean_factor: float) -> Tensor:
    """One step of the rule for one layer: updates ``m`` and ``v`` in place and returns the new
    ``[∇W | ∇b]``.  ``mean_factor`` turns the gradient into the mean loss's (1, or B for a sum)."""
    proj = rotate_in(grad, u_g, u_a)
    mean_proj = proj / mean_factor
    update_second(v, mean_proj, hp, batch)
    m_hat, v_hat = debiased(update_first(m, proj, hp.beta1), v, hp, t)
    return rotate_out(m_hat / denominator(v_hat, hp.power, hp.eps, hp.relative_eps), u_g, u_a)

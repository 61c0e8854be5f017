"""Burn-in: which iterations gather curvature statistics, which rebuild the basis, and in what order.

Today's order (``burn_in=0``, the default): every ``update_freq``-th iteration samples, rebuilds the
eigenbases from that batch's factors and preconditions *the same batch's* gradient in the new basis,
so the gradient being preconditioned is part of the curvature it is divided by, and iteration 0
takes a full second-order step from one batch's statistics.

SOAP builds each basis before the current gradient enters it: its first step only builds the basis,
and its author finds that computing the basis before adding the current statistics works better or
is more stable (nikhilvyas/SOAP issue 6).  kfac-jax likewise runs ``num_burnin_steps`` iterations
that only accumulate curvature before the first preconditioned step.  ``burn_in = K >= 1`` means
both:

* iterations ``0 .. K-1`` sample and accumulate the factors (an equal-weight mean over the K
  batches, :mod:`.factor_average`); no basis exists yet, so the preconditioned layers take no step
  at all (their ``.grad`` is zeroed, no weight decay), as SOAP's first step and kfac-jax's burn-in
  do.  An earlier version took a plain Adam step in the identity basis here: at the rates the
  eigenbasis wants (3e-2 on the image task) that first sign-like step of size ``lr`` on every weight
  made the field stiff (NFE per iteration doubled) and the loss stayed at ln 10 for 40 iterations
  (BENCHMARKS.md §6, "Fifth round");
* the first basis is built at the end of iteration ``K-1``, *after* its update; later rebuilds
  come every ``update_freq`` iterations (``K-1+update_freq``, ...), again after that iteration's
  update, so the basis an update uses never contains the batch it preconditions.

``burn_in=1`` samples on the same iterations as ``burn_in=0`` (no extra cost); it only changes the
order to SOAP's.  Larger ``K`` buys a steadier first basis for ``K-1`` extra sampling iterations.

``first_basis = D >= 1`` (``rule="adam"`` only) shifts all of the above by ``D`` iterations: iterations
``0 .. D-1`` gather nothing and the preconditioned layers run Adam in the weights' own basis; the
schedule above then starts at iteration ``D`` as if it were iteration 0, and the Adam moments are
carried into the first eigenbasis (:mod:`.basis_change`), or with ``first_moments="restart"`` start
again from zero there.  Why: where few iterations fit, a basis from one batch at the initial weights
can do worse than no rotation.  At ``D = 10`` with the moments carried it helped on two UCR sets and
cost 20 points on a third; restarted, it transferred to six sets and is the main job's timeseries and
latent default (BENCHMARKS.md §6, ninth and tenth rounds).  The engine's default stays 0.
"""
from __future__ import annotations


def gathers(step: int, burn_in: int, update_freq: int, first_basis: int = 0) -> bool:
    """Whether iteration ``step`` samples curvature statistics (the engine's sampling hook runs)."""
    step -= first_basis
    if step < 0:
        return False
    if burn_in == 0:
        return step % update_freq == 0
    return step < burn_in or (step - burn_in + 1) % update_freq == 0


def rebuilds(step: int, burn_in: int, update_freq: int, first_basis: int = 0) -> bool:
    """Whether iteration ``step`` (a gathering one) builds new bases from the factors."""
    step -= first_basis
    if step < 0:
        return False
    if burn_in == 0:
        return step % update_freq == 0
    return step >= burn_in - 1 and (step - burn_in + 1) % update_freq == 0


def deferred(burn_in: int) -> bool:
    """Whether a rebuild comes after the iteration's update (SOAP's order) instead of before it."""
    return burn_in > 0


def in_burn_in(step: int, burn_in: int, first_basis: int = 0) -> bool:
    """Whether iteration ``step`` belongs to the burn-in (its factors enter the average with equal weight)."""
    return first_basis <= step < first_basis + burn_in

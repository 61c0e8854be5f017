"""SNOpt's factors on SDEs: the sampling evaluations of one SDE backward pass, paired per layer use.

This extends SNOpt's time-sampled Kronecker factors (Liu, Chen, Theodorou, NeurIPS 2021: ODEs) to
SDEs.  It is our extension, not the paper's method; no published second-order optimiser of Neural
SDE parameters was found (``shared/notes/torchsde.md`` §3).

**What is paired.**  For a Stratonovich SDE ``dz = f dt + g ∘ dW`` the gradient of a loss is
``dL/dθ = ∫ aᵀ ∂f/∂θ dt + Σ_k ∫ aᵀ ∂g_k/∂θ ∘ dW_k`` (Li et al., AISTATS 2020).  At each sample cell
``j`` (midpoint ``t_j``, width ``Δ_j``, increment ``ΔW_j`` over the whole cell) the engine gives
``z_j, a_j`` (:class:`snopt_dyn.sde_sampling.SDESampleBatch`), and the field is evaluated once more as
torchsde's ``f_and_g_prod(t_j, z_j, ΔW_j)`` -- the step map ``φ_j = f Δ_j + prod(g, ΔW_j)`` -- and
``a_j`` back-propagated through it with :meth:`.pairing.Sampler.pair`, so each layer *use* is paired
with its own output gradient:

* a drift use: ``N · Δ_j · J_uᵀ a_j`` -- exactly the ODE rows (cotangent ``a_j``, scale ``N·Δ_j``);
* a diffusion use: ``N · J_uᵀ c_j`` with ``c_j = ∂(a_jᵀ prod(g, ΔW_j))/∂g``, i.e. ``a_j ⊙ ΔW_j``
  (diagonal noise) or ``a_j ΔW_jᵀ`` (general, scalar, additive: ``g`` is ``(B, d, m)``), with **no
  Δ weight**: ``ΔW_j`` already carries the cell (``E[ΔW ΔWᵀ] = Δ_j I``).  In code the cotangent of
  ``prod(g, ΔW_j)`` is ``a_j / Δ_j`` under the common scale ``N·Δ_j`` (so that drift rows are the ODE
  engine's bit for bit); the product is ``N · J_uᵀ c_j`` up to rounding.

**The scaling.**  With ``N`` the batch size of a mean loss (``a_j`` carries ``1/N``; ``N → 1`` for
``loss_reduction="sum"``), sample ``b``'s own gradient is
``p_b = Σ_j Σ_uses ĝ_{b,j} x̄_{b,j}ᵀ`` (midpoint sum of the two integrals above), so the rows are at
per-sample scale exactly as the ODE rows of :mod:`.statistics`, and the sum over samples and batch
rows of a layer's paired products, divided by ``N``, approximates its ``.grad`` -- with an error that
vanishes as the cells refine for midpoint cells, and not for left ends (there the diffusion sum
converges to the Itô integral).  ``A``, ``G`` and ``mult`` are then formed as for ODE fields
(means over uses and samples; ``mult`` counts every use of a sample, so a layer used by both
``f`` and ``g`` -- a shared trunk, or logqp's drift, which calls ``f``, ``g`` and ``h`` -- has two
(or more) uses per cell).

**Itô SDEs.**  torchsde solves an Itô SDE's adjoint as the Stratonovich SDE with drift
``f - ½ Σ_k (∂g_k/∂z) g_k``; the correction depends on the diffusion's parameters only.  So for a
layer that does not reach ``g`` the gradient is the ordinary ``dt`` integral ``∫ aᵀ ∂f/∂θ dt`` and its
rows are exact (drift layers are preconditioned).  A layer that reaches ``g`` also gets gradient
through the correction term, which the rows ``J_uᵀ c_j`` do not describe; those correction rows are
not derived here, so such layers (every use of them, drift uses included) are left raw, and SNOpt
says so once: written as a Stratonovich SDE (``sde_type="stratonovich"``, the drift converted by the
same correction) they are preconditioned.

**Path or fresh increments** (``SNOpt(sde_noise=...)``).  ``"path"`` (default) uses the Brownian
increments of the solve, so the paired products sum to the gradient (the per-sample moment of
``moment="per_sample"`` is then the true per-sample gradient).  ``"fresh"`` replaces ``ΔW_j`` in the
statistics only by ``√Δ_j · ε``, ``ε ~ N(0, I)`` from a private generator (the global RNG is not
touched): the same conditional expectation ``E[G | z, a] = Σ_j Δ_j J_uᵀ diag(a_j²) J_u`` up to the
correlation of ``(z_j, a_j)`` with the path's own ``ΔW_j``, decoupled from the path.

The choice was made by experiment (throwaway scripts, float64, one thread, December 2026):

* *Spread of the diffusion layers' G over 32 Brownian paths* (fixed model and batch, 8 cells):
  relative Frobenius spread 0.147 (path) vs 0.141 (fresh) on the miniature latent SDE of
  ``tests/test_sde_snopt.py`` (Stratonovich, logqp, B=32), 0.119 vs 0.114 on a regression through a
  Stratonovich SDE (diffusion ``Linear(3, 3)``, B=64); the two means differ by 5.4% and 3.4%.  Fresh
  draws remove only ~4% of the spread: most of it comes from ``(z_j, a_j)``, not from ``ΔW_j``.
* *Training* (SGD + SNOpt, refresh every 5 iterations, the same paths and batches for both): latent
  SDE, 80 iterations, 4 seeds, held-out negative ELBO median 326.07 (path) vs 326.03 (fresh) (plain
  SGD at the same, untuned rate: 2118); regression, 60 iterations, 3 seeds, test MSE median 0.2815 vs 0.2815
  (``moment="paper"``) and 0.1427 vs 0.1427 (``moment="per_sample"``).

No measurable difference, so the default is ``"path"``: it is the one consistent with the gradient
(paired products that sum to ``.grad``, which the convergence test checks), and it needs no random
numbers.  ``"fresh"`` stays available.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Set

import torch
from torch import Tensor, nn

from .batching import backward_pass_id, solve_batch_size
from .pairing import Sampler, Sink
from .statistics import output_scale

#: ``SNOpt(sde_noise=...)``: the increments the diffusion statistics use (the first is the default).
SDE_NOISE = ("path", "fresh")


def run(sampler: Sampler, batch, add: Sink, disconnected: Callable[[nn.Module], None], noise: str = "path",
        generator: Optional[torch.Generator] = None) -> Set[nn.Module]:
    """All sample cells of ``batch`` (:class:`snopt_dyn.sde_sampling.SDESampleBatch`); returns the layers
    left raw (those reaching the diffusion of an Itô SDE), whose uses were not added."""
    pass_id = backward_pass_id()
    fs = batch.forward_sde
    ito = batch.sde_type == "ito"
    raw: Set[nn.Module] = set()
    for j in range(len(batch.times)):
        t, z, a, w = batch.times[j], batch.states[j], batch.adjoints[j], batch.weights[j]
        dw = batch.increments[j]
        if noise == "fresh":
            eps = torch.randn(dw.shape, generator=generator, dtype=dw.dtype, device=dw.device)
            dw = eps * math.sqrt(float(w))
        (f, gv), uses = sampler._evaluate(lambda t_, z_: fs.f_and_g_prod(t_, z_, dw), t, z)
        n = sampler.batch_size or solve_batch_size((z,), any(u.unbatched_conv for u in uses))
        targets, cotangents = [], []
        if isinstance(f, Tensor) and f.requires_grad:
            targets.append(f)
            cotangents.append(a)
        diffusion = isinstance(gv, Tensor) and gv.requires_grad
        if diffusion and ito and uses:
            reach = torch.autograd.grad(gv, [u.target for u in uses], a, allow_unused=True, retain_graph=True)
            raw |= {u.module for u, r in zip(uses, reach) if r is not None}
            uses = [u for u in uses if u.module not in raw]
        elif diffusion:
            targets.append(gv)
            cotangents.append(a / w)
        if not targets:
            for u in uses:
                disconnected(u.module)
            continue
        if uses:
            sampler.pair(uses, targets, cotangents, n, output_scale(sampler.reduction, n, w), pass_id, add,
                         disconnected)
    return raw

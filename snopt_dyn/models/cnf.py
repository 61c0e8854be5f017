"""A reference FFJORD-style continuous normalizing flow (CNF), written with plain torchdiffeq calls.

Model (Chen et al. 2018; Grathwohl et al. 2019, "FFJORD").  A vector field ``f(t, z)`` carries a
data point ``x = z(0)`` to ``z(T)``, where the density is a standard normal.  Along the way the
log-density changes by the instantaneous change of variables ``d log p(z(t)) / dt = -tr(∂f/∂z)``.
The state is the pair ``(z, Δ)`` with ``dΔ/dt = -tr(∂f/∂z)``, ``Δ(0) = 0``, integrated **data →
base** on ``t = [0, T]``, so that::

    log p(x) = log N(z(T); 0, I) - Δ(T) = log N(z(T); 0, I) + ∫_0^T tr(∂f/∂z)(t, z(t)) dt     (nats)

Sign check with a linear field ``f = A z``: ``z(T) = e^{AT} x`` and ``tr(∂f/∂z) = tr A``, so
``log p(x) = log N(e^{AT} x; 0, I) + T·tr(A)``, which is exactly the density of
``x = e^{-AT} ε``, ``ε ~ N(0, I)`` (covariance ``e^{-AT} e^{-AᵀT}``, log-determinant ``-2T·tr A``).
(Integrating base → data with the same ``A`` instead gives ``log N(e^{-AT} x) - T·tr A``.)
:meth:`CNF.sample` integrates base → data, ``t = [T, 0]``, with ``z`` alone (no trace needed).

The field is an MLP of :class:`ConcatSquashLinear` layers (FFJORD's: ``Linear(z)`` gated by
``sigmoid(Linear(t))`` and shifted by ``Linear(t)``) with tanh or softplus activations.  Its trace is
the exact one (``d`` backward passes; fine for small ``d``) or Hutchinson's unbiased estimate
``εᵀ(∂f/∂z)ε`` with Gaussian or Rademacher ``ε`` drawn **once per forward solve** (per batch, in
:meth:`CNF.forward`) and held fixed during that solve and its adjoint backward solve -- as FFJORD
does, so the solver integrates a smooth ODE.

How it meets the engine and :class:`snopt_dyn.SNOpt`.  ``CNF.forward`` (= :meth:`CNF.log_prob`)
calls ``torchdiffeq.odeint_adjoint`` through the module attribute (``solver="torchdiffeq"``, the
default) so that :func:`snopt_dyn.wrap` routes the solve to the engine; ``solver="engine"`` calls
:func:`snopt_dyn.odeint_adjoint` directly (no wrap needed); ``solver="odeint"`` back-propagates
through torchdiffeq's solver.  The field computes its trace with ``torch.autograd.grad`` *inside*
its forward (enabling grad itself, since the engine's forward solve runs under ``no_grad``; the
double-backward graph is only built when the caller has grad enabled).  That inner autograd call
runs no module forward, so SNOpt's forward hooks record every ``nn.Linear`` of the field exactly
once per field evaluation.  The time-only Linears of ``ConcatSquashLinear`` (gate and shift) see
the time broadcast to the batch (``(N, 1)`` rows) by default, so that their factors are per-sample
statistics like those of every other layer; ``broadcast_time=True`` feeds them one ``(1, 1)`` row
(FFJORD's form).  SNOpt gives such shared rows per-sample output gradients (one batched
vector-Jacobian product), so both forms give the same preconditioned gradients
(``tests/test_curvature.py::test_broadcast_row_equals_expanded_row``).

Tolerances: the paper used rtol=1e-6/atol=1e-8 for its flows.  On 2 CPU cores that is too slow to
compare optimizers by wall clock; the diamonds flow of :mod:`snopt_dyn.flow` trains at
``rtol=atol=1e-4`` and is evaluated at ``1e-5`` (NFE, time per iteration and NLL error per tolerance
are tabulated there).  The constructor's default here is ``1e-5``.

The trace term and SNOpt's factors.  For the state output ``f`` a layer's gradient is
``Σ_b g_b x̄_bᵀ`` over its forward calls, as the factors assume.  For the log-density output
``-tr(∂f/∂z)`` it is not: the trace depends on ``W`` also through the Jacobian -- the trace's
vector-Jacobian product runs the layer backwards as ``δx = Wᵀ δy`` -- a term no output gradient of a
forward call carries (measured on a 2-d CNF, hidden 6: the forward calls alone give 86-87% error in
the paired gradient of the first layer and 39-40% of the second, exact and Hutchinson trace alike;
the time layers are exact).  ``SNOpt(model, autograd_uses=True)`` counts each such product as a
second use of the layer (``δy`` on the output side, the cotangent of ``δx`` on the input side, no
bias), which makes the paired per-sample gradients exact (error 1e-16,
``tests/test_curvature.py::test_autograd_uses_make_per_sample_gradients_exact``); the Kronecker
factors then average both kinds of use (the usual K-FAC treatment of a shared weight).

Measured effect on test NLL (diamonds, hidden 32x32, Hutchinson, dopri5 1e-4, SGD lr 0.3 + SNOpt
damping 0.05, refresh 25, J=10, batch 512, 150 iterations; exact-trace test NLL of 1,024 test rows
after 150 iterations, seeds 0 and 1, built with
``snopt_dyn.compare.tasks.flow.build_flow_model``/``evaluate_nll``): forward calls only (the default) -3.91 / -3.99 nats, trace detached
(``trace_in_curvature=False``) -3.96 / -4.01, ``autograd_uses=True`` -3.84 / -4.02 -- within
0.1 nats of each other, i.e. within seed noise on this budget.  So the approximation of the default
costs nothing measurable here; ``autograd_uses`` is the exact option, and the default stays off
until a longer benchmark says otherwise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.nn import functional as F

import snopt_dyn
from snopt_dyn import hooks

__all__ = ["ConcatSquashLinear", "CNFField", "CNF", "standard_normal_logprob"]

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over the last dimension, shape ``(N, 1)``."""
    return (-0.5 * (_LOG_2PI + z.pow(2))).sum(-1, keepdim=True)


class ConcatSquashLinear(nn.Module):
    """``Linear(x) · sigmoid(gate(t)) + shift(t)``: a Linear on the state, modulated by the time.

    ``gate`` and ``shift`` are ``nn.Linear(1, d_out)`` layers of the scalar time (``shift`` has no
    bias, it would duplicate the main layer's).  With ``broadcast_time=False`` the time enters as an
    ``(N, 1)`` column (one row per batch element); with ``True`` as a single ``(1, 1)`` row that
    broadcasts over the batch (FFJORD's form; same values, different layer-input statistics).
    """

    def __init__(self, d_in: int, d_out: int, broadcast_time: bool = False):
        super().__init__()
        self.layer = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.shift = nn.Linear(1, d_out, bias=False)
        self.broadcast_time = broadcast_time

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        if not self.broadcast_time:
            t = t.expand(x.shape[0], 1)
        return self.layer(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


_ACTIVATIONS = {"tanh": torch.tanh, "softplus": F.softplus}


class CNFField(nn.Module):
    """The CNF dynamics ``(t, (z, Δ)) -> (f(t, z), -tr ∂f/∂z)``; on a bare tensor ``z``, ``f(t, z)``.

    Args:
        dim: data dimension ``d``.
        hidden: widths of the hidden layers.
        activation: ``"tanh"`` or ``"softplus"`` (between layers; none after the last).
        trace: ``"hutchinson"`` or ``"exact"``.
        noise: ``"rademacher"`` or ``"gaussian"`` (Hutchinson only).
        broadcast_time: see :class:`ConcatSquashLinear`.
        trace_in_curvature: when ``False``, SNOpt's sampling evaluations (phase ``SAMPLE``) return
            the trace detached, so the output gradients that build the Kronecker factors come from
            the state adjoint alone (see the module notes on the trace term; for the exact
            treatment use ``SNOpt(..., autograd_uses=True)`` with the default ``True``).  Training
            gradients are unaffected.

    The Hutchinson noise lives in ``self.noise`` (shape ``(N, d)``); :meth:`CNF.forward` redraws it
    before each solve.  ``self.divergence_evals`` counts trace evaluations (for tests).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh",
                 trace: str = "hutchinson", noise: str = "rademacher", broadcast_time: bool = False,
                 trace_in_curvature: bool = True):
        super().__init__()
        if trace not in ("hutchinson", "exact"):
            raise ValueError(f"trace must be 'hutchinson' or 'exact', got {trace!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b, broadcast_time) for a, b in zip(widths[:-1], widths[1:]))
        self.dim, self.trace, self.noise_kind, self.activation = dim, trace, noise, activation
        self.noise: Optional[Tensor] = None
        self.divergence_evals = 0
        self.trace_in_curvature = trace_in_curvature

    def draw_noise(self, like: Tensor, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
        """Draw (and keep) fresh Hutchinson noise shaped like ``like``; ``None`` for the exact trace."""
        if self.trace == "exact":
            self.noise = None
            return None
        device = generator.device if generator is not None else like.device
        if self.noise_kind == "gaussian":
            noise = torch.randn(like.shape, dtype=like.dtype, device=device, generator=generator)
        else:
            noise = torch.randint(0, 2, like.shape, device=device, generator=generator).to(like.dtype) * 2 - 1
        self.noise = noise.to(like.device)
        return self.noise

    def net(self, t: Tensor, z: Tensor) -> Tensor:
        """The velocity ``f(t, z)``."""
        act = _ACTIVATIONS[self.activation]
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h

    def divergence(self, dz: Tensor, z: Tensor, create_graph: bool) -> Tensor:
        """``tr(∂f/∂z)`` per row, shape ``(N,)``: exact, or Hutchinson with ``self.noise``."""
        self.divergence_evals += 1
        if self.trace == "exact":
            div = dz.new_zeros(dz.shape[0])
            for i in range(self.dim):
                div = div + torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph,
                                                retain_graph=True)[0][:, i]
            return div
        e = self.noise
        if e is None or e.shape != z.shape:
            raise RuntimeError("CNFField: Hutchinson noise of the batch's shape is not set; call "
                               "draw_noise(z) before solving (CNF.forward does this)")
        e = e.to(z)
        vjp = torch.autograd.grad(dz, z, e, create_graph=create_graph)[0]
        return (vjp * e).sum(-1)

    def forward(self, t: Tensor, state: Union[Tensor, Tuple[Tensor, Tensor]]):
        if isinstance(state, Tensor):  # sampling: the flow alone
            return self.net(t, state)
        z, _ = state
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            div = self.divergence(dz, z, create_graph=outer_grad)
        if not outer_grad:  # a no-grad forward solve: keep no graph
            dz, div = dz.detach(), div.detach()
        elif not self.trace_in_curvature and hooks.current_phase() == hooks.SAMPLE:
            div = div.detach()
        return dz, -div.unsqueeze(-1)


class CNF(nn.Module):
    """A continuous normalizing flow with a standard normal base; ``forward(x)`` is ``log p(x)``.

    Args:
        dim, hidden, activation, trace, noise, broadcast_time, trace_in_curvature: the field
            (:class:`CNFField`).
        T: integration time of the flow (data at ``t=0``, base at ``t=T``).
        method, rtol, atol: torchdiffeq solver and tolerances (forward and adjoint).
        solver: ``"torchdiffeq"`` (``torchdiffeq.odeint_adjoint``: native, or the engine after
            :func:`snopt_dyn.wrap`), ``"engine"`` (:func:`snopt_dyn.odeint_adjoint`) or ``"odeint"``
            (``torchdiffeq.odeint``, back-propagation through the solver).
        seminorm: backward error control on ``[z, a]`` only, for both adjoints.
        noise_seed: seed of the model's own (CPU) generator for the Hutchinson noise, so that the
            noise sequence does not depend on other users of the global RNG; ``None``: global RNG.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), *, activation: str = "tanh",
                 trace: str = "hutchinson", noise: str = "rademacher", T: float = 1.0,
                 method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                 solver: str = "torchdiffeq", seminorm: bool = True, broadcast_time: bool = False,
                 trace_in_curvature: bool = True, noise_seed: Optional[int] = None):
        super().__init__()
        if solver not in ("torchdiffeq", "engine", "odeint"):
            raise ValueError(f"solver must be 'torchdiffeq', 'engine' or 'odeint', got {solver!r}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        self.field = CNFField(dim, hidden, activation, trace, noise, broadcast_time, trace_in_curvature)
        self.dim, self.T = dim, float(T)
        self.method, self.rtol, self.atol, self.solver, self.seminorm = method, rtol, atol, solver, seminorm
        self.noise_generator = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None

    def _solve(self, state, t: Tensor):
        if self.solver == "engine":
            return snopt_dyn.odeint_adjoint(self.field, state, t, method=self.method, rtol=self.rtol,
                                            atol=self.atol, seminorm=self.seminorm)
        if self.solver == "odeint":
            return torchdiffeq.odeint(self.field, state, t, method=self.method, rtol=self.rtol, atol=self.atol)
        adjoint_options = {"norm": "seminorm"} if self.seminorm else None
        return torchdiffeq.odeint_adjoint(self.field, state, t, method=self.method, rtol=self.rtol,
                                          atol=self.atol, adjoint_options=adjoint_options)

    def forward(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """``log p(x)`` in nats, shape ``(N,)``.  ``noise`` fixes the Hutchinson noise of this solve
        (default: a fresh draw, from the model's ``noise_seed`` generator or the global RNG)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"CNF expects data of shape (N, {self.dim}), got {tuple(x.shape)}")
        if noise is None:
            self.field.draw_noise(x, self.noise_generator)
        else:
            self.field.noise = noise
        t = torch.tensor([0.0, self.T], dtype=x.dtype, device=x.device)
        delta0 = x.new_zeros(x.shape[0], 1)
        zs, deltas = self._solve((x, delta0), t)
        return (standard_normal_logprob(zs[-1]) - deltas[-1]).squeeze(-1)

    def log_prob(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Same as ``self(x)`` (call the module, not this method, inside a wrapped model's forward)."""
        return self(x, noise)

    def nll(self, x: Tensor) -> Tensor:
        """Mean negative log-likelihood in nats (the training loss)."""
        return -self(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples: base noise integrated from ``t=T`` back to ``t=0`` (no trace computed)."""
        p = next(self.parameters())
        z = torch.randn(n, self.dim, dtype=p.dtype, device=p.device, generator=generator)
        t = torch.tensor([self.T, 0.0], dtype=p.dtype, device=p.device)
        return torchdiffeq.odeint(self.field, z, t, method=self.method, rtol=self.rtol, atol=self.atol)[-1]

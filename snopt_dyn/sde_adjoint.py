"""The engine's SDE adjoint: a drop-in for ``torchsde.sdeint_adjoint``, with O(1) memory.

The same shape as the ODE engine (:mod:`snopt_dyn.adjoint`): an autograd function whose forward
solves without a graph, and whose backward integrates the adjoint SDE from the last output time to
the first, one output segment at a time, resetting the state to the forward's value and adding
``dL/dz(t_i)`` at every output time.  The numerics are torchsde's own (:mod:`snopt_dyn.sde_torchsde`:
the contract check, the solvers, the adjoint SDE ``[z, a, a_θ]`` and the reversed Brownian motion),
run in torchsde's order, so outputs and gradients equal torchsde's bit for bit, for every method and
adjoint method, noise type (diagonal, general, scalar, additive) and SDE type (Itô, Stratonovich),
with ``logqp``, ``names``, ``adjoint_params``, ``extra`` and ``extra_solver_state``.

The Brownian motion is never rebuilt: the backward pass queries the caller's ``bm`` (or the
``BrownianInterval`` created for the forward), reversed.  ``method="reversible_heun"`` with
``adjoint_method="adjoint_reversible_heun"`` (the default adjoint for it) reconstructs the forward's
numerical trajectory algebraically, so its gradient is that of back-propagation through the solver
up to rounding (Kidger et al., NeurIPS 2021); the other adjoint methods solve the continuous adjoint
SDE (Li et al., AISTATS 2020) and are approximate to the step size.

Observers of :mod:`snopt_dyn.hooks` that define ``sde_sample_spec``/``on_sde_samples`` get
``(t_j, z(t_j), a(t_j))`` and the Brownian increment ``ΔW_j`` of each sample cell
(:mod:`snopt_dyn.sde_sampling`); sampling changes no solver step and no gradient.

Evaluations of the SDE made by the engine -- torchsde's shape check at ``ts[0]``, the reversible Heun
start, the forward and backward solves -- run in the phase :data:`snopt_dyn.hooks.SOLVE`, so layer
hooks never take them for ordinary forward calls.  Not supported: double backward (``create_graph``
through the solve) raises ``NotImplementedError``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import hooks
from .adjoint import nfe
from .sde_sampling import SDESampler, wants_samples
from .sde_torchsde import TorchsdeParts, parts as _torchsde_parts


@dataclass
class _Setup:
    """One solve: torchsde's ``ForwardSDE`` around the user's SDE, the Brownian motion the forward
    used (queried again, reversed, by the backward) and the backward's settings."""

    sde: nn.Module                # torchsde's ForwardSDE (names and logqp applied)
    user_sde: Any                 # what the user passed: what observers know the solve by
    bm: Any
    dt: float
    solver: Any                   # the forward solver (a torchsde solver instance)
    adjoint_method: str
    adjoint_adaptive: bool
    adjoint_rtol: float
    adjoint_atol: float
    dt_min: float
    adjoint_options: Dict[str, Any]
    n_extras: int                 # tensors of solver state (the reversible Heun family: f, g and z)
    keep_extras: bool             # the reversible Heun pair: the backward starts from the forward's solver state
    torchsde: TorchsdeParts
    counter: "_EvaluationCounter"


#: the user's SDE methods that torchsde's ``ForwardSDE`` binds; each call is one evaluation
_COUNTED = ("f", "g", "f_and_g", "g_prod", "f_and_g_prod")


class _EvaluationCounter:
    """Counts the user's drift and diffusion evaluations into :data:`snopt_dyn.nfe` (``f``, ``g``,
    ``g_prod`` or a fused ``f_and_g[_prod]``: one each), split by pass, as the ODE engine counts its
    field: rebinds the methods torchsde's ``ForwardSDE`` took from the user's SDE, nothing else."""

    def __init__(self, forward_sde: nn.Module):
        self.pass_name = "forward"
        base = getattr(forward_sde, "_base_sde", None)
        for name in _COUNTED:
            method = forward_sde.__dict__.get(name)
            if method is not None and getattr(method, "__self__", None) is base:
                forward_sde.__dict__[name] = self._counting(method)

    def _counting(self, method):
        def counted(*args, **kwargs):
            if self.pass_name == "forward":
                nfe.forward += 1
            else:
                nfe.backward += 1
            return method(*args, **kwargs)
        return counted


class _SDEAdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, ts: Tensor, y0: Tensor, *extras_and_params: Tensor):
        extras = tuple(x.detach() for x in extras_and_params[:setup.n_extras])
        params = extras_and_params[setup.n_extras:]
        with hooks.phase(hooks.SOLVE):
            ys, extras = setup.solver.integrate(y0.detach(), ts, extras)
        ctx.setup = setup
        ctx.save_for_backward(ys, ts, *(extras if setup.keep_extras else ()), *params)
        return (ys, *extras)

    @staticmethod
    def backward(ctx, grad_ys: Tensor, *grad_extras: Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "snopt_dyn.sdeint_adjoint does not support double backward (create_graph=True through the "
                "solve). Fix: call torchsde.sdeint_adjoint for this solve (inside snopt_dyn.no_interception() "
                "for a wrapped model), or differentiate once.")
        setup: _Setup = ctx.setup
        setup.counter.pass_name = "backward"
        ys, ts, *saved = ctx.saved_tensors
        kept = setup.n_extras if setup.keep_extras else 0
        extras, params = tuple(saved[:kept]), tuple(saved[kept:])
        grads = _backward(setup, ts, ys, extras, params, grad_ys, grad_extras if setup.keep_extras else ())
        y0_grad, extra_grads, param_grads = grads
        if not setup.keep_extras:
            extra_grads = (None,) * setup.n_extras
        return (None, None, y0_grad, *extra_grads, *param_grads)


def _backward(setup: _Setup, ts: Tensor, ys: Tensor, extras: Tuple[Tensor, ...], params: Tuple[Tensor, ...],
              grad_ys: Tensor, grad_extras: Sequence[Tensor]) -> tuple:
    """Solve the adjoint SDE back over every output segment (torchsde's loop, in torchsde's order).

    The augmented state is torchsde's ``[z, a, (a_f, a_g, a_z,) a_θ]`` flattened with a leading
    dimension of 1; returns ``(dL/dy0, dL/d(extras), dL/dθ)``."""
    sde_lib = setup.torchsde
    aug = [ys[-1], grad_ys[-1], *grad_extras, *(torch.zeros_like(p) for p in params)]
    shapes = [x.size() for x in aug]
    adjoint_sde = sde_lib.AdjointSDE(setup.sde, list(params), shapes)  # a list, as torchsde passes it
    solver = sde_lib.select(method=setup.adjoint_method, sde_type=adjoint_sde.sde_type)(
        sde=adjoint_sde, bm=sde_lib.ReverseBrownian(setup.bm), dt=setup.dt, adaptive=setup.adjoint_adaptive,
        rtol=setup.adjoint_rtol, atol=setup.adjoint_atol, dt_min=setup.dt_min, options=setup.adjoint_options)
    state = sde_lib.flatten(aug).unsqueeze(0)
    with hooks.phase(hooks.SOLVE):
        solver_state = extras if setup.keep_extras else solver.init_extra_solver_state(ts[-1], state)
    sampler = SDESampler(setup.user_sde, ts.tolist() if wants_samples() else [])
    for i in range(ys.size(0) - 1, 0, -1):
        state, solver_state = _solve_segment(solver, sampler, ts, ys, state, solver_state, i)
        aug = sde_lib.flat_to_shape(state.squeeze(0), shapes)
        aug[0] = ys[i - 1]  # the forward value: stops drift of the reconstructed state
        aug[1] = aug[1] + grad_ys[i - 1]
        state = sde_lib.flatten(aug).unsqueeze(0)
    if sampler:
        sampler.deliver(setup.user_sde, setup.sde, setup.bm, ys.shape[1:], ts.dtype)
    n_extra = len(grad_extras)
    return aug[1], tuple(aug[2:2 + n_extra]), tuple(aug[2 + n_extra:])


def _solve_segment(solver, sampler: SDESampler, ts: Tensor, ys: Tensor, state: Tensor,
                   solver_state: Tuple[Tensor, ...], i: int):
    """The adjoint state at ``ts[i-1]`` from the one at ``ts[i]`` (reversed time ``-ts[i] -> -ts[i-1]``);
    sample times inside the segment are extra output times, read without changing the steps."""
    n = ys[i].numel()
    grid, _ = sampler.grid(i, ts)  # ts[i], the segment's sample times (descending), ts[i-1]
    start = (ys[i].reshape(-1), state[0, n:2 * n].clone()) if sampler else None
    with torch.no_grad(), hooks.phase(hooks.SOLVE):
        sol, solver_state = solver.integrate(state.detach(), -grid, tuple(x.detach() for x in solver_state))
    sampler.record(i, sol[:, 0], start, ys[i - 1].reshape(-1), n)
    return sol[-1], tuple(solver_state)


# ----------------------------------------------------------------------------------------------
# argument checks (the conditions torchsde refuses, with the fix named)


def _check_inputs(y0, ts) -> None:
    if isinstance(y0, Tensor) and y0.dim() != 2:
        raise ValueError(f"y0 must be a 2-D tensor of shape (batch, channels), got shape {tuple(y0.shape)}; "
                         "torchsde takes no other state shape. Fix: y0.reshape(batch, -1), and reshape "
                         "the solution back")
    if isinstance(ts, Tensor) and ts.requires_grad:
        raise ValueError("ts must not require grad: torchsde cannot differentiate with respect to the output "
                         "times. Fix: pass ts.detach()")
    values = ts.detach().tolist() if isinstance(ts, Tensor) and ts.dim() == 1 else \
        list(ts) if isinstance(ts, (tuple, list)) and all(isinstance(t, (int, float)) for t in ts) else None
    if values is not None and not all(a < b for a, b in zip(values, values[1:])):
        raise ValueError(f"ts must be strictly increasing (torchsde solves forward in time only), got {values}; "
                         "remove repeated times and sort them")


def _warn_reversible_heun(sde_lib: TorchsdeParts, method: str, adjoint_method: str, adaptive: bool,
                          adjoint_adaptive: bool, ts: Tensor, dt) -> None:
    """torchsde's warnings for the reversible Heun method, word for word."""
    if method != sde_lib.METHODS.reversible_heun:
        return
    if adjoint_method != sde_lib.METHODS.adjoint_reversible_heun:
        warnings.warn(f"method={repr(method)}, but adjoint_method!={repr(sde_lib.METHODS.adjoint_reversible_heun)}.")
    if adaptive or adjoint_adaptive:
        warnings.warn(f"A limitation of the current method={repr(method)} implementation is "
                      f"that it does not save the time steps used. This means that it may not be perfectly "
                      f"accurate when used with `adaptive` or `adjoint_adaptive`.")
    else:
        num_steps = (ts - ts[0]) / dt
        if not torch.allclose(num_steps, num_steps.round()):
            warnings.warn(f"The spacing between time points `ts` is not an integer multiple of the time step `dt`. "
                          f"This means that the backward pass (which is forced to step to each of `ts` to get "
                          f"dL/dy(t) for t in ts) will not perfectly mimick the forward pass (which does not step "
                          f"to each `ts`, and instead interpolates to them). This means that "
                          f"method={repr(method)} may not be perfectly accurate.")


def sdeint_adjoint(sde: nn.Module, y0: Tensor, ts, bm=None, method: Optional[str] = None,
                   adjoint_method: Optional[str] = None, dt=1e-3, adaptive: bool = False,
                   adjoint_adaptive: bool = False, rtol=1e-5, adjoint_rtol=1e-5, atol=1e-4, adjoint_atol=1e-4,
                   dt_min=1e-5, options: Optional[Dict[str, Any]] = None,
                   adjoint_options: Optional[Dict[str, Any]] = None, adjoint_params=None,
                   names: Optional[Dict[str, str]] = None, logqp: bool = False, extra: bool = False,
                   extra_solver_state=None, **unused_kwargs):
    """Solve an SDE and get gradients by the stochastic adjoint: ``torchsde.sdeint_adjoint``'s signature,
    defaults and results (see its documentation), on the engine.

    ``sde`` has ``noise_type``, ``sde_type`` and ``f``/``g`` (or ``f_and_g``, ``g_prod``,
    ``f_and_g_prod``); ``y0`` is ``(batch, d)``; ``ts`` is strictly increasing and does not require
    grad.  Returns ``ys`` of shape ``(len(ts), batch, d)``, plus ``log_ratio_increments``
    (``logqp=True``) and the solver's final state (``extra=True``), as torchsde.  Defaults: the
    forward method is ``srk`` for Itô diagonal/additive/scalar noise, ``euler`` for Itô general noise,
    ``midpoint`` for Stratonovich; the adjoint method is ``adjoint_reversible_heun`` after
    ``reversible_heun``, else ``milstein`` (Itô diagonal), ``euler`` (other Itô) or ``midpoint``
    (Stratonovich).  ``adjoint_params`` (default: the parameters of ``sde`` requiring grad) are the
    tensors that get gradients.

    Raises:
        ValueError: the inputs torchsde refuses (``y0`` not 2-D, ``ts`` not strictly increasing or
            requiring grad, an unknown method or noise type, a non-module ``sde`` without
            ``adjoint_params``), with the fix named where it is ours to name.
        ImportError: torchsde is missing or of a version this was not checked against.
        NotImplementedError: on double backward through the solve.
    """
    sde_lib = _torchsde_parts()
    sde_lib.handle_unused_kwargs(unused_kwargs, msg="`sdeint_adjoint`")
    if adjoint_params is None and not isinstance(sde, nn.Module):
        raise ValueError("sde must be an nn.Module so that its parameters can be found; otherwise pass the "
                         "tensors that need gradients as adjoint_params= (adjoint_params=() if there are none)")
    _check_inputs(y0, ts)
    user_sde = sde
    with hooks.phase(hooks.SOLVE):  # torchsde calls f and g once at ts[0] to check their shapes
        sde, y0, ts, bm, method, options = sde_lib.check_contract(sde, y0, ts, bm, method, adaptive, options,
                                                                  names, logqp)
    counter = _EvaluationCounter(sde)
    sde_lib.assert_no_grad(["ts", "dt", "rtol", "adjoint_rtol", "atol", "adjoint_atol", "dt_min"],
                           [ts, dt, rtol, adjoint_rtol, atol, adjoint_atol, dt_min])
    params = tuple(sde.parameters()) if adjoint_params is None else tuple(adjoint_params)
    params = tuple(p for p in params if p.requires_grad)
    adjoint_method = sde_lib.default_adjoint_method(sde, method, adjoint_method)
    _warn_reversible_heun(sde_lib, method, adjoint_method, adaptive, adjoint_adaptive, ts, dt)
    solver = sde_lib.select(method=method, sde_type=sde.sde_type)(
        sde=sde, bm=bm, dt=dt, adaptive=adaptive, rtol=rtol, atol=atol, dt_min=dt_min, options=options)
    if extra_solver_state is None:
        with hooks.phase(hooks.SOLVE):  # reversible Heun starts from f and g at ts[0] (with their graph)
            extra_solver_state = solver.init_extra_solver_state(ts[0], y0)
    keep = method == sde_lib.METHODS.reversible_heun and adjoint_method == sde_lib.METHODS.adjoint_reversible_heun
    setup = _Setup(sde=sde, user_sde=user_sde, bm=bm, dt=dt, solver=solver, adjoint_method=adjoint_method,
                   adjoint_adaptive=adjoint_adaptive, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                   dt_min=dt_min, adjoint_options={} if adjoint_options is None else dict(adjoint_options),
                   n_extras=len(extra_solver_state), keep_extras=keep, torchsde=sde_lib,
                   counter=counter)
    ys, *extra_solver_state = _SDEAdjointSolve.apply(setup, ts, y0, *extra_solver_state, *params)
    return sde_lib.parse_return(y0, ys, extra_solver_state, extra, logqp)

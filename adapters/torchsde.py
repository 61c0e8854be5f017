"""torchsde adapter: ``sdeint_adjoint`` (and, where exact, ``sdeint``) calls on wrapped SDEs run on the engine.

How it works.  As for torchdiffeq (:mod:`snopt_dyn.adapters.torchdiffeq`): :func:`install` rebinds,
process-wide and until :func:`uninstall`, every name bound to torchsde's ``sdeint``/``sdeint_adjoint``
-- the attributes of the ``torchsde`` module (torchcde's ``backend="torchsde"`` looks them up there at
call time), every global of a user module and every instance attribute of the wrapped model's
submodules.  The stand-ins route by the identity of ``sde``
(:func:`snopt_dyn.interception.route_of`): an ``sde`` that is, or contains, a module of a wrapped
model goes to the engine; anything else runs torchsde's original with the same arguments.

What goes where.

* ``sdeint_adjoint`` on a wrapped SDE: always :func:`snopt_dyn.sdeint_adjoint`, with the user's
  arguments unchanged.  Outputs and gradients are torchsde's bit for bit (same numerics, same
  Brownian object).
* ``sdeint`` (back-propagation through the solver) on a wrapped SDE, with a gradient:

  - ``method="reversible_heun"`` with fixed steps and ``ts`` on the ``dt`` grid (torchsde's own
    exactness condition): the engine with ``adjoint_method="adjoint_reversible_heun"``, whose
    gradient is back-propagation's up to rounding, at O(1) memory;
  - any other method: torchsde's own solver, unless ``snopt_dyn.wrap(model, sde_backprop="adjoint")``
    asks for the engine's stochastic adjoint (torchsde's default adjoint method for that method; its
    gradient then approximates back-propagation's to the step size).  Staying native is said once,
    naming the fix, because SNOpt then sees those layers run by another library's solver.

  The routed ``sdeint`` differentiates the SDE module's parameters, buffers and tensor attributes
  that require grad, less any tensor attribute computed from others of them (a context made by the
  module's own encoder, torchcde's ``_derivs`` made from ``_coeffs``: listing both would count the
  gradient of the first twice, once from the engine and once back through the second's history).
  If the drift or diffusion reads another tensor requiring grad (a context held in a tuple or a
  closure), the engine could not give it a gradient, so the call stays native and this is said once.
* Without a gradient (``torch.no_grad()``), ``sdeint`` runs torchsde's solver: the forward is the same.

``wrap``'s ``method``/``rtol``/``atol``/``eval_tol``/``per_sample_error`` are ODE settings: torchsde
solves keep their own method, ``dt`` and tolerances (said once when they were given).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Dict, Optional

import torch
from torch import Tensor

import torchsde

from .. import hooks
from ..interception import Route, SolverNames, route_of
from ..sde_adjoint import sdeint_adjoint as _engine_sdeint_adjoint
from .module_tensors import module_tensors, reaches_unlisted

#: torchsde's own functions, read from its implementation modules (which are never patched)
ORIGINALS: Dict[str, Any] = {"sdeint": sys.modules["torchsde._core.sdeint"].sdeint,
                             "sdeint_adjoint": sys.modules["torchsde._core.adjoint"].sdeint_adjoint}
#: ``wrap(sde_backprop=...)``: what a plain ``sdeint`` on a wrapped SDE does when not exact on the engine
BACKPROP_MODES = ("native", "adjoint")
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _route(sde) -> Optional[Route]:
    if hooks.current_phase() != hooks.OUTSIDE:
        return None  # a solve nested inside an engine evaluation
    route = route_of(sde)
    if route is not None:
        options = route.options
        if any(getattr(options, k, None) is not None for k in ("method", "rtol", "atol", "eval_tol")):
            _warn_once("ode-settings", "snopt_dyn.wrap(method=/rtol=/atol=/eval_tol=) applies to ODE and CDE "
                                       "solves only; torchsde solves keep their own method, dt and tolerances")
    return route


def sdeint_adjoint(sde, y0, ts, bm=None, method=None, adjoint_method=None, dt=1e-3, adaptive=False,
                   adjoint_adaptive=False, rtol=1e-5, adjoint_rtol=1e-5, atol=1e-4, adjoint_atol=1e-4, dt_min=1e-5,
                   options=None, adjoint_options=None, adjoint_params=None, names=None, logqp=False, extra=False,
                   extra_solver_state=None, **unused_kwargs):
    """Stand-in for ``torchsde.sdeint_adjoint``: the engine for a wrapped ``sde``."""
    kwargs = dict(bm=bm, method=method, adjoint_method=adjoint_method, dt=dt, adaptive=adaptive,
                  adjoint_adaptive=adjoint_adaptive, rtol=rtol, adjoint_rtol=adjoint_rtol, atol=atol,
                  adjoint_atol=adjoint_atol, dt_min=dt_min, options=options, adjoint_options=adjoint_options,
                  adjoint_params=adjoint_params, names=names, logqp=logqp, extra=extra,
                  extra_solver_state=extra_solver_state, **unused_kwargs)
    solver = _engine_sdeint_adjoint if _route(sde) is not None else ORIGINALS["sdeint_adjoint"]
    return solver(sde, y0, ts, **kwargs)


def sdeint(sde, y0, ts, bm=None, method=None, dt=1e-3, adaptive=False, rtol=1e-5, atol=1e-4, dt_min=1e-5,
           options=None, names=None, logqp=False, extra=False, extra_solver_state=None, **unused_kwargs):
    """Stand-in for ``torchsde.sdeint``: the engine where it is exact (the reversible Heun pair) or
    asked for (``wrap(sde_backprop="adjoint")``), torchsde's solver otherwise (see the module docstring)."""
    kwargs = dict(bm=bm, method=method, dt=dt, adaptive=adaptive, rtol=rtol, atol=atol, dt_min=dt_min,
                  options=options, names=names, logqp=logqp, extra=extra, extra_solver_state=extra_solver_state,
                  **unused_kwargs)
    route = _route(sde)
    if route is None or not torch.is_grad_enabled():
        return ORIGINALS["sdeint"](sde, y0, ts, **kwargs)
    exact = _exact_reversible_heun(method, adaptive, ts, dt)
    if not exact and backprop_mode(route) != "adjoint":
        _warn_once("native-sdeint", _native_message(method))
        return ORIGINALS["sdeint"](sde, y0, ts, **kwargs)
    tensors = module_tensors(sde)  # routed: sde is an nn.Module
    unlisted = _reads_unlisted_tensors(sde, y0, ts, names, logqp, tensors)
    if unlisted is not None:
        _warn_once("unlisted-" + unlisted, _unlisted_message(unlisted))
        return ORIGINALS["sdeint"](sde, y0, ts, **kwargs)
    if exact:
        kwargs["adjoint_method"] = "adjoint_reversible_heun"
    else:
        kwargs.update(adjoint_adaptive=adaptive, adjoint_rtol=rtol, adjoint_atol=atol)
    return _engine_sdeint_adjoint(sde, y0, ts, adjoint_params=tensors, **kwargs)


def backprop_mode(route: Route) -> str:
    """``wrap(sde_backprop=...)`` of the wrapped model (``"native"`` unless asked)."""
    return getattr(route.options, "sde_backprop", "native")


def _exact_reversible_heun(method, adaptive, ts, dt) -> bool:
    """torchsde's condition for the reversible Heun adjoint to reproduce back-propagation: fixed steps,
    output times on the step grid."""
    if method != "reversible_heun" or adaptive:
        return False
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
    steps = (ts - ts[0]) / float(dt)
    return bool(torch.allclose(steps, steps.round()))


def _native_message(method) -> str:
    return (f"snopt_dyn.wrap: torchsde.sdeint(method={method!r}) on a wrapped SDE back-propagates through "
            "torchsde's own solver, so SNOpt sees its drift and diffusion layers as run by another library's "
            "solver and leaves their gradients raw. Fix: method='reversible_heun' with a fixed dt that divides "
            "the spacing of ts (the engine's exact adjoint pair), or torchsde.sdeint_adjoint, or "
            "snopt_dyn.wrap(model, sde_backprop='adjoint') to use the engine's stochastic adjoint (its gradient "
            "then approximates back-propagation's to the step size)")


#: what :func:`_reads_unlisted_tensors` returns when the SDE has no drift it can evaluate by name
NO_DRIFT = "no drift"


def _unlisted_message(where: str) -> str:
    if where == NO_DRIFT:
        return ("snopt_dyn.wrap: the SDE defines its drift only through a product form (g_prod / "
                "f_and_g_prod), so the engine cannot check which tensors it reads and cannot promise their "
                "gradients; this torchsde.sdeint call keeps torchsde's own solver. Fix: define f (or "
                "f_and_g) on the SDE module, or call torchsde.sdeint_adjoint with adjoint_params=(...)")
    return (f"snopt_dyn.wrap: the SDE's {where} reads a tensor that requires grad but is neither a parameter, "
            "a buffer nor a tensor attribute of the SDE module (a context in a tuple, a closure), so the "
            "engine could not give it a gradient; this torchsde.sdeint call keeps torchsde's own solver. "
            "Fix: store that tensor as an attribute of the SDE module, or call torchsde.sdeint_adjoint with "
            "adjoint_params=(that tensor, *sde.parameters())")


def _reads_unlisted_tensors(sde, y0, ts, names, logqp, tensors) -> Optional[str]:
    """Evaluate the drift and diffusion once at ``ts[0]`` (phase SOLVE, detached state) and walk their
    graph: the name of the first function that reaches a tensor requiring grad other than ``tensors``
    (:data:`NO_DRIFT` when no drift can be found by name), else ``None``."""
    if not isinstance(y0, Tensor) or y0.dim() != 2:
        return None  # the engine refuses it with torchsde's condition and a clear message
    names = names or {}
    functions = [("drift", "f"), ("diffusion", "g"), ("drift_and_diffusion", "f_and_g")]
    if logqp:
        functions.append(("prior_drift", "h"))
    found = [(key, getattr(sde, names.get(key, default), None)) for key, default in functions]
    found = [(key, fn) for key, fn in found if callable(fn)]
    if not any(key in ("drift", "drift_and_diffusion") for key, _ in found):
        return NO_DRIFT  # only g_prod / f_and_g_prod forms: nothing to evaluate safely
    t0 = torch.as_tensor(ts[0], dtype=y0.dtype, device=y0.device).detach()
    with torch.enable_grad(), hooks.phase(hooks.SOLVE):
        for key, fn in found:
            out = fn(t0, y0.detach())
            if reaches_unlisted(out if isinstance(out, (tuple, list)) else (out,), tensors):
                return key.replace("_", " ")
    return None


REPLACEMENTS = {"sdeint": sdeint, "sdeint_adjoint": sdeint_adjoint}
PAIRS = [(ORIGINALS[k], REPLACEMENTS[k]) for k in ORIGINALS]
_names = SolverNames(torchsde, PAIRS)
install_globals, install, uninstall = _names.install_globals, _names.install, _names.uninstall


def ensure_installed() -> None:
    """What an unpickled wrapped model calls: install once per process (a module function, so that
    the model pickles it by name)."""
    _names.ensure_installed()

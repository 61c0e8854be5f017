"""torchdiffeq (and torchcde) adapter: ``odeint``/``odeint_adjoint`` calls on wrapped modules run on the engine.

How it works.  :func:`install` rebinds, process-wide and until :func:`uninstall`, every name bound
to torchdiffeq's ``odeint``/``odeint_adjoint``: the attributes ``torchdiffeq.odeint`` and
``torchdiffeq.odeint_adjoint`` (torchcde's ``cdeint`` looks them up there at call time), every
global of a user module (``from torchdiffeq import odeint_adjoint as odeint``, in a model's module,
a helper module or the training script; see :mod:`snopt_dyn.discovery`), and every instance
attribute of the wrapped model's submodules (``self.odesolve = odeint_adjoint``).  The stand-ins
:func:`odeint` and :func:`odeint_adjoint` route by the identity of ``func``
(:func:`snopt_dyn.interception.route_of`): a ``func`` that is, or contains, a module of a wrapped
model goes to the engine; anything else -- another model, a plain function, the engine's own
solver calls -- runs torchdiffeq's original with the same arguments.  No hook runs per field
evaluation, and no state lives across a call, so an interrupt leaves nothing behind.

Mapping onto the engine.  ``odeint_adjoint``'s arguments go to :func:`snopt_dyn.odeint_adjoint`
unchanged (its signature and defaults are torchdiffeq's, ``adjoint_options["norm"]`` included,
which wins over the engine's ``seminorm``), with ``seminorm=`` :func:`snopt_dyn.wrap`'s option
added and wrap's ``method``/``rtol``/``atol`` overrides applied.  Plain ``odeint``
(back-propagation through the solver) on a wrapped ``nn.Module`` also goes to the engine adjoint --
O(1) memory and visible to SNOpt; gradients then reach the module's parameters and every tensor the
module (or a submodule) holds that requires grad, as a buffer or a plain tensor attribute (e.g.
torchcde's spline coefficients; a tensor kept from an earlier iteration with a freed graph must not
stay attached).  A plain function that closes over a wrapped module keeps torchdiffeq's solver
with a one-time warning (the engine cannot find what it depends on).

Not rerouted (they run torchdiffeq's own solver): a reference to the original taken *before* the
first wrap and kept somewhere other than a module global or a submodule attribute (a local
variable, a closure, a dict, a ``functools.partial``), and ``from torchdiffeq._impl.odeint import
odeint``.  Take such references after wrapping, or call :func:`snopt_dyn.odeint_adjoint`.
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

import torchdiffeq

from .. import hooks, per_sample
from ..adjoint import odeint_adjoint as _engine_odeint_adjoint
from ..discovery import all_namespaces
from ..interception import ROUTE, Route, SolverNames, WrapOptions, route_of
from ..terminal_time import rescale_to_horizon, terminal_time_leaf
from .module_tensors import module_tensors

#: torchdiffeq's own functions, read from its implementation modules (which are never patched);
#: kept only in this dict, so that no module of ours has a global bound to them
ORIGINALS: Dict[str, Any] = {"odeint": sys.modules["torchdiffeq._impl.odeint"].odeint,
                             "odeint_adjoint": sys.modules["torchdiffeq._impl.adjoint"].odeint_adjoint}
_warned: set = set()
_SOLVES = "_snopt_solves"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _engine_is_new() -> bool:
    """The engine with torchdiffeq's signature (``method=None``, ``event_fn``, norms in adjoint_options)."""
    return "event_fn" in inspect.signature(_engine_odeint_adjoint).parameters


def _engine_route(func) -> Optional[Route]:
    if hooks.current_phase() != hooks.OUTSIDE:
        return None  # the engine's own solver calls, or a solve nested inside a field evaluation
    route = route_of(func)
    if route is None and not isinstance(func, nn.Module):
        _warn_if_hides_wrapped(func)
    return route


def _warn_if_hides_wrapped(func) -> None:
    """A plain function or bound method around a wrapped module: say that it is not intercepted."""
    holders = [getattr(func, "__self__", None)] + [c.cell_contents for c in getattr(func, "__closure__", None) or ()
                                                  if _cell_filled(c)]
    if any(isinstance(h, nn.Module) and ROUTE in h.__dict__ for h in holders):
        _warn_once("plain-function", "snopt_dyn.wrap: torchdiffeq was called with a plain function (or a bound "
                   "method) around a wrapped module, not an nn.Module; the tensors it depends on cannot be "
                   "found, so this solve keeps torchdiffeq's own solver (not the engine adjoint, not visible "
                   "to SNOpt). Pass the vector field as an nn.Module with forward(t, y).")


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _engine_kwargs(options: WrapOptions, kwargs: dict, func) -> dict:
    """The user's arguments with wrap's overrides applied (forward and backward)."""
    kwargs = dict(kwargs)
    evaluating = per_sample.is_evaluation(tuple(m for m in func.modules() if ROUTE in m.__dict__))
    tol = options.eval_tol if evaluating else None
    for key in ("method", "rtol", "atol"):
        value = tol if tol is not None and key != "method" else getattr(options, key)
        if value is not None:
            kwargs[key] = kwargs[f"adjoint_{key}"] = value
    kwargs["seminorm"] = options.seminorm
    if not _engine_is_new():
        return _for_old_engine(kwargs)
    kwargs["per_sample_error"] = _per_sample(options.per_sample_error, evaluating, kwargs.get("options"))
    return kwargs


def _per_sample(mode, evaluating: bool, user_options: Optional[dict]) -> bool:
    """Whether this solve gets per-sample error control (wrap's ``per_sample_error``); a solve's own
    ``options["norm"]`` wins, with a warning when wrap asked for per-sample control always."""
    if user_options and user_options.get("norm") is not None:
        if mode is True:
            _warn_once("user-norm", "snopt_dyn.wrap(per_sample_error=True): this solve passes its own "
                                    "options['norm'], which is kept; drop it to get per-sample error control")
        return False
    return evaluating if mode == "eval" else bool(mode)


def _for_old_engine(kwargs: dict) -> dict:
    """The engine before torchdiffeq's signature: no ``event_fn``, a method name, no user norms."""
    if kwargs.pop("event_fn", None) is not None:
        raise NotImplementedError("snopt_dyn.wrap: odeint(event_fn=...) (terminal events) is not supported by "
                                  "this engine version; solve up to the event with torchdiffeq inside "
                                  "`with snopt_dyn.no_interception():`")
    kwargs["method"] = kwargs.get("method") or "dopri5"
    options, adjoint_options = kwargs.get("options"), kwargs.get("adjoint_options")
    if adjoint_options is None and options:
        adjoint_options = {k: v for k, v in options.items() if k != "norm"}  # torchdiffeq's rule
    if adjoint_options and "norm" in adjoint_options:
        adjoint_options = dict(adjoint_options)
        norm = adjoint_options.pop("norm")
        kwargs["seminorm"] = isinstance(norm, str) and norm == "seminorm"
        if callable(norm):
            _warn_once("adjoint-norm", "snopt_dyn.wrap: this engine version replaces a custom "
                                       "adjoint_options['norm'] by its own norm over the adjoint state")
    kwargs["adjoint_options"] = adjoint_options
    return kwargs


def _horizon(t, y0, route: Route):
    """``t`` stretched to the trainable horizon of the wrapped model, when it has one."""
    owner = route.horizon_owner
    if owner is None:
        return t
    solves = owner.__dict__.get(_SOLVES)
    if solves is not None:
        if solves[0]:
            raise ValueError("snopt_dyn.wrap(train_terminal_time=True): this model solves more than one ODE per "
                             "forward (e.g. an ODE-RNN between observations), so its time grid is fixed by the "
                             "data; a trainable terminal time needs a single solve per forward")
        solves[0] += 1
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=y0[0].dtype if isinstance(y0, (tuple, list)) else y0.dtype)
    return rescale_to_horizon(t, terminal_time_leaf(owner))


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """Stand-in for ``torchdiffeq.odeint_adjoint``: the engine adjoint for a wrapped ``func``."""
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                  adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
                  adjoint_options=adjoint_options, adjoint_params=adjoint_params)
    route = _engine_route(func)
    if route is None:
        return ORIGINALS["odeint_adjoint"](func, y0, t, **kwargs)
    kwargs = _engine_kwargs(route.options, kwargs, func)
    return _engine_odeint_adjoint(func, y0, _horizon(t, y0, route), backend="torchdiffeq", **kwargs)


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Stand-in for ``torchdiffeq.odeint``: the engine adjoint for a wrapped ``func`` (an ``nn.Module``)."""
    kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn)
    route = _engine_route(func)
    if route is None:
        return ORIGINALS["odeint"](func, y0, t, **kwargs)
    kwargs = _engine_kwargs(route.options, dict(kwargs, adjoint_params=module_tensors(func)), func)
    return _engine_odeint_adjoint(func, y0, _horizon(t, y0, route), backend="torchdiffeq", **kwargs)


REPLACEMENTS = {"odeint": odeint, "odeint_adjoint": odeint_adjoint}
PAIRS = [(ORIGINALS[k], REPLACEMENTS[k]) for k in ORIGINALS]
_names = SolverNames(torchdiffeq, PAIRS)
install_globals, install, uninstall = _names.install_globals, _names.install, _names.uninstall


def ensure_installed() -> None:
    """What an unpickled wrapped model calls: install once per process (a module function, so that
    the model pickles it by name)."""
    _names.ensure_installed()


def count_solves_per_forward(owner: nn.Module) -> None:
    """A forward pre-hook that resets ``owner``'s solve counter (for the one-solve-per-forward check of a
    trainable horizon); the counter is reset, never restored, so an interrupt cannot leave it stale."""
    if not any(isinstance(h, _ResetSolves) for h in owner._forward_pre_hooks.values()):
        owner.register_forward_pre_hook(_ResetSolves())
    object.__setattr__(owner, _SOLVES, [0])


class _ResetSolves:
    """Forward pre-hook (picklable)."""

    def __call__(self, module: nn.Module, args) -> None:
        object.__setattr__(module, _SOLVES, [0])


def installed_everywhere() -> bool:
    """Whether no loaded user module still binds torchdiffeq's original functions (for tests)."""
    originals = tuple(ORIGINALS.values())
    return not any(v is o for space in all_namespaces() for v in list(space.values()) for o in originals) and \
        torchdiffeq.odeint is odeint and torchdiffeq.odeint_adjoint is odeint_adjoint

"""torchdiffeq (and torchcde) adapter: route ``odeint``/``odeint_adjoint`` calls to the engine.

How it works.  :func:`install` registers two hooks on the wrapped model: a forward *pre*-hook (run
first) and a forward hook with ``always_call=True`` (run even when the forward raises).  While the
model's forward runs, the pre-hook replaces

* the attributes ``torchdiffeq.odeint`` and ``torchdiffeq.odeint_adjoint`` (torchcde's ``cdeint``
  looks them up there at call time), and
* every global name, in the modules defining the classes of the model's submodules (and their base
  classes), that *is* torchdiffeq's ``odeint`` or ``odeint_adjoint`` (``from torchdiffeq import
  odeint_adjoint as odeint``),

by :func:`odeint` and :func:`odeint_adjoint` of this module; the forward hook puts the originals
back.  ``from torchcde import cdeint`` needs nothing more: ``cdeint`` calls
``torchdiffeq.odeint_adjoint`` (``adjoint=True``) or ``torchdiffeq.odeint`` (``adjoint=False``).

Mapping onto the engine.  ``odeint_adjoint`` keeps torchdiffeq's defaults (``rtol=1e-7``,
``atol=1e-9``, ``method="dopri5"`` when ``None``), passes ``options`` and ``adjoint_params``
through (torchcde passes the spline coefficients there), maps ``adjoint_options={"norm":
"seminorm"}`` to ``seminorm=True`` and any other ``"norm"`` to ``seminorm=False`` (the engine then
uses its full norm), and without a ``"norm"`` uses :func:`snopt_dyn.wrap`'s ``seminorm`` option.
Plain ``odeint`` (back-propagation through the solver) goes to the engine when ``func`` is an
``nn.Module`` -- O(1) memory and visible to SNOpt; gradients then reach the module's parameters and
every tensor the module (or a submodule) holds that requires grad, as a buffer or a plain tensor
attribute (e.g. torchcde's spline coefficients, a conditioning vector stored before the solve; a
tensor kept from an earlier iteration with a freed graph must not stay attached) -- and otherwise
falls back to the original with a one-time warning (a plain function may close over tensors the
engine cannot find).  ``event_fn`` raises
``NotImplementedError``.

Thread safety and re-entrancy.  Patching is process-wide while a wrapped forward runs on some
thread, so during that time ``torchdiffeq.odeint is <original>`` is false everywhere.  The
replacements themselves, however, only use the engine on a thread that is inside a wrapped forward;
any other caller (another thread, the engine's own solver calls) gets the original function with its
original behaviour.  Patches are reference counted under a lock, so nested wrapped models,
recursion and concurrent wrapped forwards on several threads restore the originals exactly when the
last of them returns.  One gap: torch runs ``always_call`` hooks for ``Exception`` only, so a
``KeyboardInterrupt`` inside a wrapped forward leaves the patches in place; :func:`restore_all`
undoes them (the replacements keep behaving like the originals outside wrapped forwards anyway).
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import torchdiffeq
from torchdiffeq._impl.adjoint import odeint_adjoint as _original_odeint_adjoint
from torchdiffeq._impl.odeint import odeint as _original_odeint

from .. import hooks
from ..adjoint import _Field
from ..adjoint import odeint_adjoint as _engine_odeint_adjoint
from ..terminal_time import rescale_to_horizon, terminal_time_leaf
from ..wrapping import WrapOptions, user_namespaces

ORIGINALS = {"odeint": _original_odeint, "odeint_adjoint": _original_odeint_adjoint}

_lock = threading.RLock()
# (id(namespace), name) -> [namespace, name, original, replacement, count]
_active: Dict[Tuple[int, str], list] = {}
_local = threading.local()
_warned: set = set()


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _current_options() -> Optional[WrapOptions]:
    """Options of the innermost wrapped forward running on this thread, or ``None``."""
    stack = _stack()
    return stack[-1][2] if stack else None


def _horizon(t, y0) -> Tensor:
    """``t`` stretched to the wrapped model's trainable horizon, when it has one (one solve per forward)."""
    entry = _stack()[-1]
    model, solves = entry[3], entry[4]
    if not entry[2].train_terminal_time:
        return t
    if solves[0]:
        raise ValueError("snopt_dyn.wrap(train_terminal_time=True): this model solves more than one ODE per "
                         "forward (e.g. an ODE-RNN between observations), so its time grid is fixed by the "
                         "data; a trainable terminal time needs a single solve per forward")
    solves[0] += 1
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=y0[0].dtype if isinstance(y0, (tuple, list)) else y0.dtype)
    return rescale_to_horizon(t, terminal_time_leaf(model))


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _use_engine() -> Optional[WrapOptions]:
    if hooks.current_phase() != hooks.OUTSIDE:
        return None  # the engine's own solver calls, or a solve nested inside a field evaluation
    return _current_options()


def _adjoint_settings(options: WrapOptions, method, rtol, atol, solver_options, adjoint_rtol, adjoint_atol,
                      adjoint_method, adjoint_options) -> dict:
    method = "dopri5" if method is None else method
    adjoint_method = method if adjoint_method is None else adjoint_method
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol
    if options.method is not None:
        method = adjoint_method = options.method
    if options.rtol is not None:
        rtol = adjoint_rtol = options.rtol
    if options.atol is not None:
        atol = adjoint_atol = options.atol
    solver_options = dict(solver_options) if solver_options else None
    if adjoint_options is None:
        # torchdiffeq's rule: the backward solve reuses `options` without the state norm.
        adjoint_options = {k: v for k, v in solver_options.items() if k != "norm"} if solver_options else None
        seminorm = options.seminorm
    else:
        adjoint_options = dict(adjoint_options)
        if "norm" in adjoint_options:
            norm = adjoint_options.pop("norm")
            seminorm = isinstance(norm, str) and norm == "seminorm"
            if callable(norm):
                _warn_once("adjoint-norm", "snopt_dyn.wrap: a custom adjoint_options['norm'] is replaced by "
                                           "the engine's RMS norm over the adjoint state (no seminorm)")
        else:
            seminorm = options.seminorm
    return dict(method=method, rtol=rtol, atol=atol, options=solver_options, adjoint_method=adjoint_method,
                adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_options=adjoint_options,
                seminorm=seminorm)


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """Stand-in for ``torchdiffeq.odeint_adjoint`` inside a wrapped forward: the engine adjoint."""
    wrap_options = _use_engine()
    if wrap_options is None or isinstance(func, _Field):
        return _original_odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                        event_fn=event_fn, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                        adjoint_method=adjoint_method, adjoint_options=adjoint_options,
                                        adjoint_params=adjoint_params)
    if event_fn is not None:
        raise NotImplementedError("snopt_dyn.wrap: odeint_adjoint(event_fn=...) (terminal events) is not "
                                  "supported by the engine adjoint; call this solve outside the wrapped model")
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError("func must be an instance of nn.Module to specify the adjoint parameters; "
                         "alternatively pass them explicitly via `adjoint_params`")
    settings = _adjoint_settings(wrap_options, method, rtol, atol, options, adjoint_rtol, adjoint_atol,
                                 adjoint_method, adjoint_options)
    params = None if adjoint_params is None else tuple(adjoint_params)
    t = _horizon(t, y0)
    return _engine_odeint_adjoint(func, y0, t, backend="torchdiffeq", adjoint_params=params, **settings)


def _module_tensors(func: nn.Module) -> Tuple[Tensor, ...]:
    """Parameters, buffers and tensor attributes of ``func`` (and its submodules) requiring grad."""
    found: List[Tensor] = []
    seen = set()

    def add(x: Any) -> None:
        if isinstance(x, Tensor) and x.requires_grad and id(x) not in seen:
            seen.add(id(x))
            found.append(x)

    for p in func.parameters():
        add(p)
    for b in func.buffers():
        add(b)
    for m in func.modules():
        for v in vars(m).values():
            add(v)
    return tuple(found)


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Stand-in for ``torchdiffeq.odeint`` inside a wrapped forward: the engine adjoint when ``func``
    is an ``nn.Module``, else the original (with a one-time warning)."""
    wrap_options = _use_engine()
    if wrap_options is None or isinstance(func, _Field):
        return _original_odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                event_fn=event_fn)
    if not isinstance(func, nn.Module):
        _warn_once("odeint-function",
                   "snopt_dyn.wrap: torchdiffeq.odeint was called with a plain function, not an nn.Module; "
                   "its parameters cannot be found, so this solve keeps torchdiffeq's backprop-through-the-"
                   "solver (not the engine adjoint, not visible to SNOpt). Make the vector field an nn.Module.")
        return _original_odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                event_fn=event_fn)
    if event_fn is not None:
        raise NotImplementedError("snopt_dyn.wrap: odeint(event_fn=...) (terminal events) is not supported "
                                  "by the engine adjoint; call this solve outside the wrapped model")
    settings = _adjoint_settings(wrap_options, method, rtol, atol, options, None, None, None, None)
    t = _horizon(t, y0)
    return _engine_odeint_adjoint(func, y0, t, backend="torchdiffeq", adjoint_params=_module_tensors(func),
                                  **settings)


REPLACEMENTS = {"odeint": odeint, "odeint_adjoint": odeint_adjoint}


def _targets(model: nn.Module) -> List[Tuple[dict, str, str]]:
    """Every (namespace, name, kind) to patch for ``model``; kind is "odeint" or "odeint_adjoint"."""
    ns = vars(torchdiffeq)
    targets = [(ns, "odeint", "odeint"), (ns, "odeint_adjoint", "odeint_adjoint")]
    for space in user_namespaces(model):
        for name, value in list(space.items()):
            for kind in ("odeint", "odeint_adjoint"):
                if value is ORIGINALS[kind] or value is REPLACEMENTS[kind]:
                    targets.append((space, name, kind))
    return targets


def _enter(model: nn.Module, options: WrapOptions) -> None:
    with _lock:
        keys = []
        for space, name, kind in _targets(model):
            key = (id(space), name)
            if key in keys:
                continue
            entry = _active.get(key)
            if entry is not None:
                entry[4] += 1
            elif space.get(name) is ORIGINALS[kind]:
                space[name] = REPLACEMENTS[kind]
                _active[key] = [space, name, ORIGINALS[kind], REPLACEMENTS[kind], 1]
            else:
                continue  # someone else's value (or a stale replacement): leave it alone
            keys.append(key)
        _stack().append((id(model), keys, options, model, [0]))


def _exit(model: nn.Module) -> None:
    stack = _stack()
    if not stack or stack[-1][0] != id(model):
        return  # our pre-hook did not run for this call (an earlier pre-hook raised)
    keys = stack.pop()[1]
    with _lock:
        for key in keys:
            entry = _active.get(key)
            if entry is None:
                continue
            entry[4] -= 1
            if entry[4] <= 0:
                space, name, original, replacement, _ = entry
                if space.get(name) is replacement:  # leave a value the user assigned meanwhile
                    space[name] = original
                del _active[key]


def restore_all() -> None:
    """Put every patched name back and forget all running wrapped forwards (e.g. after a
    ``KeyboardInterrupt`` skipped the restoring hook)."""
    with _lock:
        for space, name, original, replacement, _ in _active.values():
            if space.get(name) is replacement:
                space[name] = original
        _active.clear()
    _stack().clear()


class EnterHook:
    """Forward pre-hook: patch while the wrapped model's forward runs (picklable)."""

    def __init__(self, options: WrapOptions):
        self.options = options

    def __call__(self, module: nn.Module, args) -> None:
        _enter(module, self.options)


class ExitHook:
    """Forward hook with ``always_call=True``: restore after the forward returns or raises."""

    def __call__(self, module: nn.Module, args, output) -> None:
        _exit(module)


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(h, EnterHook) for h in model._forward_pre_hooks.values())


def install(model: nn.Module, options: WrapOptions) -> None:
    """Register the hooks on ``model`` (once; a second call only updates the options)."""
    for h in model._forward_pre_hooks.values():
        if isinstance(h, EnterHook):
            h.options = options
            return
    model.register_forward_pre_hook(EnterHook(options), prepend=True)
    model.register_forward_hook(ExitHook(), always_call=True)

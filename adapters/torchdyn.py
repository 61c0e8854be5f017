"""torchdyn adapter: ``NeuralODE`` instances solved by the engine adjoint.

:func:`wrap_neural_ode` switches the class of a ``torchdyn.core.NeuralODE`` instance, in place, to
:class:`EngineNeuralODE` (or, for a user subclass ``C`` of ``NeuralODE``, to a subclass of ``C``
created here and importable by name, so the model still pickles).  Only the solving step changes:
``NeuralODE.forward`` still runs torchdyn's ``_prep_integration`` (default ``t_span``,
``DataControl`` inputs stored on the vector field, CNF noise), returns ``(t_eval, sol)`` or ``sol``
(``return_t_eval=False``) with ``sol`` time first, and then ``odeint`` -- overridden here -- calls
:func:`snopt_dyn.odeint_adjoint` with ``backend="torchdyn"``, the NeuralODE's vector field
``node.vf`` (a ``DEFunc``, called as ``vf(t, x)``; ``DepthCat`` receives ``t`` as before) and the
user's ``solver``, ``atol`` and ``rtol``.  Adaptive solvers land on every ``t_span`` point; for
fixed-step solvers ``t_span`` is the step grid, as in torchdyn.

Whatever ``sensitivity`` the NeuralODE was built with (``"autograd"``, ``"adjoint"``,
``"interpolated_adjoint"``), the engine computes the gradients: O(1) memory, correct gradients for
``t_span`` (torchdyn's own adjoint gets ``dL/dt0`` wrong), visible to :class:`snopt_dyn.SNOpt`.  For
``"adjoint"``/``"interpolated_adjoint"`` the backward solve uses the NeuralODE's ``solver_adjoint``,
``atol_adjoint`` and ``rtol_adjoint``; for ``"autograd"`` it reuses the forward settings.
:func:`snopt_dyn.wrap`'s ``method``/``rtol``/``atol`` override both.  As in torchdyn, an
``"interpolated_adjoint"`` NeuralODE with an adaptive solver returns *every* point its solver
stepped on (not only ``t_span``): wrapped, those points come from one extra forward solve without
grad, and the engine then solves onto them.  ``trajectory`` also runs on
the engine.  ``save_at`` is honoured for fixed-step solvers (adaptive ones ignore it, as in
torchdyn); ``args`` is ignored as in torchdyn (its solvers never pass it to the field).

Not supported (``wrap`` raises ``ValueError``): solvers the engine does not run (implicit Euler,
asynchronous leapfrog, user-defined solver modules), dict states, and an ``integral_loss`` with an
adjoint sensitivity (the engine does not integrate it).  With ``sensitivity="autograd"`` an
integral loss is carried in the state by torchdyn's ``DEFunc`` and works unchanged.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor

from torchdyn.core.neuralde import NeuralODE
from torchdyn.numerics.odeint import odeint as _torchdyn_odeint
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from ..adjoint import odeint_adjoint as _engine_odeint_adjoint
from ..terminal_time import attach_terminal_time, rescale_to_horizon, terminal_time_leaf
from .. import hooks, per_sample
from ..interception import WrapOptions

_ENGINE_SOLVERS = ("euler", "midpoint", "rk4", "dopri5", "tsit5")
_FIXED_STEP = ("euler", "midpoint", "rk4")


def solver_name(solver) -> str:
    """The torchdyn name of a solver (a name or a torchdyn solver instance)."""
    if isinstance(solver, str):
        if solver in SOLVER_DICT:
            solver = SOLVER_DICT[solver]
        else:
            raise ValueError(f"unknown torchdyn solver {solver!r}")
    else:
        solver = type(solver)
    for name in _ENGINE_SOLVERS:
        if SOLVER_DICT[name] is solver:
            return name
    raise ValueError(f"snopt_dyn.wrap: the NeuralODE's solver {solver.__name__} cannot run on the engine "
                     f"adjoint; use one of {list(_ENGINE_SOLVERS)} (or leave this NeuralODE unwrapped)")


def _settings(node: NeuralODE, options: WrapOptions) -> dict:
    method = solver_name(node.solver)
    rtol, atol = node.rtol, node.atol
    if node.sensitivity in ("adjoint", "interpolated_adjoint"):
        adjoint_method = solver_name(node.solver_adjoint)
        adjoint_rtol, adjoint_atol = node.rtol_adjoint, node.atol_adjoint
    else:
        adjoint_method, adjoint_rtol, adjoint_atol = method, rtol, atol
    if options.method is not None:
        method = adjoint_method = solver_name(options.method)
    if options.rtol is not None:
        rtol = adjoint_rtol = options.rtol
    if options.atol is not None:
        atol = adjoint_atol = options.atol
    if options.eval_tol is not None and per_sample.is_evaluation((node,)):
        rtol = atol = adjoint_rtol = adjoint_atol = options.eval_tol
    return dict(method=method, rtol=float(rtol), atol=float(atol), adjoint_method=adjoint_method,
                adjoint_rtol=float(adjoint_rtol), adjoint_atol=float(adjoint_atol), seminorm=options.seminorm)


def check(node: NeuralODE, options: WrapOptions) -> None:
    """Raise ``ValueError`` when ``node`` cannot run on the engine (nothing is changed)."""
    settings = _settings(node, options)
    if options.per_sample_error is True and settings["method"] not in _FIXED_STEP:
        raise ValueError(f"snopt_dyn.wrap(per_sample_error=True): torchdyn's adaptive solver "
                         f"{settings['method']!r} takes no custom error norm; use a fixed-step solver "
                         "(euler, midpoint, rk4: their steps do not depend on the batch) or "
                         "per_sample_error='eval'/False")
    if node.integral_loss is not None and node.sensitivity != "autograd":
        raise ValueError("snopt_dyn.wrap: a NeuralODE with integral_loss and sensitivity="
                         f"{node.sensitivity!r} is not supported (the engine adjoint does not integrate the "
                         "loss); use sensitivity='autograd', where torchdyn carries it in the state")


class _EngineSolveMixin:
    """Overrides the solving step of a torchdyn ``ODEProblem``/``NeuralODE``."""

    def odeint(self, x: Tensor, t_span: Tensor, save_at=(), args={}) -> Tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise NotImplementedError(f"snopt_dyn: a wrapped NeuralODE needs a tensor state, got {type(x).__name__}")
        options: WrapOptions = getattr(self, "_snopt_wrap", None) or WrapOptions()
        check(self, options)
        settings = _settings(self, options)
        if not isinstance(t_span, Tensor):
            t_span = torch.as_tensor(t_span, dtype=x.dtype)
        t_span = t_span.to(x.device)
        if options.train_terminal_time:
            t_span = rescale_to_horizon(t_span, terminal_time_leaf(self))
        if self.sensitivity == "interpolated_adjoint" and settings["method"] not in _FIXED_STEP:
            solver = self.solver if options.method is None else settings["method"]
            t_span = _solver_points(self.vf, x, t_span, solver, settings)
        _warn_if_batch_dependent(self, options, settings["method"])
        sol = _engine_odeint_adjoint(self.vf, x, t_span, backend="torchdyn", **settings)
        if settings["method"] in _FIXED_STEP and len(save_at) > 0:
            save_at = torch.as_tensor(save_at).to(t_span)
            if options.train_terminal_time:
                raise ValueError("snopt_dyn.wrap: save_at with a trainable terminal time is not supported")
            keep = torch.stack([torch.isclose(t_span, s).nonzero()[0, 0] for s in save_at])
            return save_at, sol[keep]
        return t_span, sol

    def trajectory(self, x: Tensor, t_span: Tensor) -> Tensor:
        x, t_span = self._prep_integration(x, t_span)
        return self.odeint(x, t_span)[1]


_warned: set = set()


def _warn_if_batch_dependent(node: NeuralODE, options: WrapOptions, method: str) -> None:
    """With ``per_sample_error="eval"``, say once that torchdyn's adaptive solvers cannot give it."""
    if options.per_sample_error != "eval" or method in _FIXED_STEP or "eval" in _warned:
        return
    if per_sample.is_evaluation((node,)):
        _warned.add("eval")
        warnings.warn(f"snopt_dyn.wrap: torchdyn's adaptive solver {method!r} has one error norm over the "
                      "whole batch (no per-sample error control), so a prediction can depend on the other "
                      "samples of its batch at about the solver tolerance; predict with a tighter rtol/atol, "
                      "a fixed-step solver, or one batch size throughout", RuntimeWarning, stacklevel=4)


def _solver_points(vf, x: Tensor, t_span: Tensor, solver, settings: dict) -> Tensor:
    """Every point torchdyn's adaptive solver steps on, as its ``interpolated_adjoint`` returns them.

    Found by one extra solve without grad with the NeuralODE's own solver instance (its tableau's dtype
    decides the steps), so the forward costs twice a plain one; then written as a
    piecewise-linear function of ``t_span`` so that time gradients still reach ``t_span``."""
    with torch.no_grad(), hooks.phase(hooks.SOLVE):
        points, _ = _torchdyn_odeint(vf, x, t_span.detach(), solver, atol=settings["atol"],
                                     rtol=settings["rtol"], return_all_eval=True)
    knots = t_span.detach()
    sign = 1.0 if bool(knots[-1] > knots[0]) else -1.0
    points = points.to(knots)
    keep = torch.cat([points.new_ones(1, dtype=torch.bool), sign * (points[1:] - points[:-1]) > 0])
    points = points[keep]
    seg = (torch.searchsorted(sign * knots, sign * points, right=True) - 1).clamp(0, len(knots) - 2)
    frac = (points - knots[seg]) / (knots[seg + 1] - knots[seg])
    return t_span[seg] + frac * (t_span[seg + 1] - t_span[seg])


class EngineNeuralODE(_EngineSolveMixin, NeuralODE):
    """A torchdyn ``NeuralODE`` whose solves (and gradients) come from the engine adjoint."""


_PREFIX = "EngineSubclass_"
_SEP = "_CLS_"


def _encode(cls: type) -> str:
    return _PREFIX + cls.__module__.replace(".", "_DOT_") + _SEP + cls.__qualname__.replace(".", "_DOT_")


def _engine_subclass(cls: type) -> type:
    if issubclass(cls, _EngineSolveMixin):
        return cls
    if cls is NeuralODE:
        return EngineNeuralODE
    name = _encode(cls)
    sub = globals().get(name)
    if sub is None:
        sub = type(name, (_EngineSolveMixin, cls), {"__module__": __name__, "__qualname__": name,
                                                     "__doc__": f"{cls.__qualname__} solved by the engine adjoint."})
        globals()[name] = sub
    return sub


def __getattr__(name: str):
    """Recreate engine subclasses of user NeuralODE subclasses by name (for unpickling)."""
    if name.startswith(_PREFIX):
        module, _, qualname = name[len(_PREFIX):].partition(_SEP)
        module = module.replace("_DOT_", ".")
        import importlib
        obj = importlib.import_module(module)
        for part in qualname.replace("_DOT_", ".").split("."):
            obj = getattr(obj, part)
        return _engine_subclass(obj)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wrap_neural_ode(node: NeuralODE, options: WrapOptions) -> NeuralODE:
    """Switch ``node`` (in place) to its engine class and record ``options`` on it."""
    check(node, options)
    node.__class__ = _engine_subclass(type(node))
    vf_params = node.__dict__.get("vf_params")
    if isinstance(vf_params, Tensor) and vf_params.grad_fn is not None:
        # torchdyn's own adjoint keeps this concatenation of the parameters (with its autograd
        # graph, which breaks copy.deepcopy); the engine never reads it.
        node.vf_params = vf_params.detach()
    object.__setattr__(node, "_snopt_wrap", options)
    if options.train_terminal_time:
        # default: the horizon of the NeuralODE's own t_span (torchdyn's default t_span is [0, 1])
        span = 1.0 if node.t_span is None else float(node.t_span[-1] - node.t_span[0])
        attach_terminal_time(node, span if options.terminal_time is None else options.terminal_time)
    return node


def unwrap_neural_ode(node: NeuralODE) -> NeuralODE:
    """Undo :func:`wrap_neural_ode` (back to the original class)."""
    cls = type(node)
    if issubclass(cls, _EngineSolveMixin):
        base = next(c for c in cls.__mro__[1:] if not issubclass(c, _EngineSolveMixin))
        node.__class__ = base
        node.__dict__.pop("_snopt_wrap", None)
    return node


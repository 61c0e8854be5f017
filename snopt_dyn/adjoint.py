"""The engine adjoint: O(1)-memory gradients of an ODE solve, a drop-in for torchdiffeq's, with a
sampling hook.

The forward solve keeps no autograd graph.  The backward pass integrates the augmented state
``[z, a, mu, tau]`` (:mod:`snopt_dyn.augmented`) from the last output time to the first, adding
``dL/dz(t_i)`` at every output time, so memory does not grow with the number of solver steps.  Time
gradients are exact: ``dL/dt_i = g_i . f(t_i, z_i)`` for ``i > 0`` and ``dL/dt_0 = -a(t_0+) . f(t_0, z_0)``.

Conventions follow ``torchdiffeq.odeint_adjoint`` (signature, defaults rtol 1e-7 / atol 1e-9,
``method=None`` meaning dopri5, 0-dim and tuple states, a single output time, callbacks, the error
norms of :mod:`snopt_dyn.structure` and ``adjoint_options["norm"]``).  Observers registered in
:mod:`snopt_dyn.hooks` may ask for samples ``(t_j, z(t_j), a(t_j))``; :mod:`snopt_dyn.sampling` gets
them as dense outputs of the backward solve, which never changes its steps (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import hooks
from .augmented import CALLBACKS, AugmentedDynamics
from .errors import SolverError
from .per_sample import per_sample_norm
from .sampling import Sampler
from .solvers import SolverBackend, get_backend
from .structure import Structure, adjoint_norm

State = Union[Tensor, Tuple[Tensor, ...]]
_Structure = Structure  # the name older code imported

DEFAULT_MAX_NFE = 100_000


@dataclass
class NFECounter:
    """Field evaluations made by the engine since the last :meth:`reset`, split by pass."""

    forward: int = 0
    backward: int = 0

    def reset(self) -> None:
        self.forward = self.backward = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward


nfe = NFECounter()
_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class _Field:
    """The user's field on the flat state: checks the output shape, counts and caps evaluations,
    and forwards the user's ``callback_step/_accept_step/_reject_step`` with the state's structure."""

    def __init__(self, func: Callable, structure: Structure, max_nfe: int):
        self.func = func
        self.structure = structure
        self.max_nfe = max_nfe
        self.calls = 0
        self.pass_name = "forward"
        for name in CALLBACKS:
            callback = getattr(func, name, None)
            if callback is not None:
                setattr(self, name, lambda t0, y0, dt, _cb=callback: _cb(t0, structure.unflatten(y0), dt))

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > self.max_nfe:
            raise SolverError(
                f"the {self.pass_name} solve took more than {self.max_nfe} field evaluations without "
                "finishing; the dynamics may be stiff or exploding. Loosen rtol/atol, use a fixed-step "
                "method, or raise max_nfe.")
        if self.pass_name == "forward":
            nfe.forward += 1
        else:
            nfe.backward += 1
        out = self.func(t, self.structure.unflatten(y))
        self._check(out)
        return self.structure.flatten(out)

    def _check(self, out) -> None:
        shapes = self.structure.shapes
        if self.structure.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(shapes) or any(
                    not isinstance(o, Tensor) or o.shape != s for o, s in zip(out, shapes)):
                got = [tuple(getattr(o, "shape", ())) for o in out] if isinstance(out, (tuple, list)) \
                    else type(out).__name__
                raise ValueError(f"func returned {got} but the state has shapes {[tuple(s) for s in shapes]}; "
                                 "the field must return dz/dt with the state's structure and shapes")
        elif not isinstance(out, Tensor) or out.shape != shapes[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"func returned shape {got} but the state y0 has shape {tuple(shapes[0])}; "
                             "the field must return dz/dt of the state's shape")


@dataclass
class _Setup:
    func: Callable
    field: _Field
    structure: Structure
    backend: SolverBackend
    t_host: List[float]
    method: str
    rtol: float
    atol: float
    options: dict
    state_norm: Optional[Callable]          # the forward norm on the flat state (None: the solver's own)
    adjoint_method: str
    adjoint_rtol: float
    adjoint_atol: float
    adjoint_options: dict
    seminorm: bool
    adjoint_user_norm: Optional[Callable]   # adjoint_options["norm"] when a callable

    def backward_norm(self, params: Sequence[Tensor]) -> Callable:
        state_norm = self.state_norm or self.structure.state_norm()
        return adjoint_norm(self.structure, [p.shape for p in params], state_norm, self.seminorm,
                            self.adjoint_user_norm)


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, y0: Tensor, t: Tensor, *params: Tensor) -> Tensor:
        setup.field.pass_name = "forward"
        setup.field.calls = 0
        if len(t) == 1:
            ys = y0.detach()[None].clone()  # torchdiffeq: a single output time returns y0
        else:
            with torch.no_grad(), hooks.phase(hooks.SOLVE):
                ys = setup.backend.solve(setup.field, y0, t, method=setup.method, rtol=setup.rtol,
                                         atol=setup.atol, options=setup.options, norm=setup.state_norm)
        ctx.setup = setup
        ctx.save_for_backward(t, ys, *params)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        setup: _Setup = ctx.setup
        t, ys, *params = ctx.saved_tensors
        return (None,) + _backward(setup, t.detach(), ys, tuple(params), grad_ys, ctx.needs_input_grad[2])


def _backward(setup: _Setup, t: Tensor, ys: Tensor, params: Tuple[Tensor, ...], grad_ys: Tensor,
              want_t: bool) -> tuple:
    """Integrate ``[z, a, mu, tau]`` back over every output segment; hand out the samples asked for."""
    if not torch.isfinite(grad_ys).all():  # one host sync per backward pass
        return _nan_gradients(ys, t, params, want_t)
    n = setup.structure.numel
    setup.field.pass_name = "backward"
    setup.field.calls = 0
    dyn = AugmentedDynamics(setup.field, params, n, setup.structure.unflatten, setup.func)
    norm = setup.backward_norm(params)
    sampler = Sampler(setup.func, setup.t_host)
    aug = dyn.initial(ys[-1], grad_ys[-1])
    t_grad = torch.zeros_like(t) if want_t else None
    if want_t and len(t) > 1:
        t_grad[-1] = _dot(_field_value(setup, t[-1], ys[-1]), grad_ys[-1]).to(t.dtype)
    for i in range(len(t) - 1, 0, -1):
        aug = _solve_segment(setup, dyn, norm, sampler, t, ys, aug, i)
        if want_t:
            value = _dot(_field_value(setup, t[i - 1], ys[i - 1]), grad_ys[i - 1] if i > 1 else -aug[n:2 * n])
            t_grad[i - 1] = value.to(t.dtype)
        aug[n:2 * n] += grad_ys[i - 1]
    if sampler:
        sampler.deliver(setup.func, setup.structure.unflatten, t.dtype, ys.device)
    y0_grad, param_grads = dyn.split(aug, params)
    return (y0_grad, t_grad, *param_grads)


def _solve_segment(setup: _Setup, dyn: AugmentedDynamics, norm: Callable, sampler: Sampler, t: Tensor,
                   ys: Tensor, aug: Tensor, i: int) -> Tensor:
    """The augmented state at ``t[i-1]`` from the one at ``t[i]``, reset to the forward ``z(t[i-1])``."""
    n = setup.structure.numel
    grid, dense = sampler.grid(i, t)
    start = (ys[i], aug[n:2 * n].clone())
    with hooks.phase(hooks.SOLVE):
        sol = setup.backend.solve(dyn, aug, grid, method=setup.adjoint_method, rtol=setup.adjoint_rtol,
                                  atol=setup.adjoint_atol, options=setup.adjoint_options, norm=norm,
                                  seminorm_dims=2 * n if setup.seminorm else None, dense=dense)
    sampler.record(i, sol, start, ys[i - 1], n)
    aug = sol[-1].clone()
    aug[:n] = ys[i - 1]  # the forward value: stops drift of the reconstructed state
    return aug


def _field_value(setup: _Setup, ti: Tensor, yi: Tensor) -> Tensor:
    with torch.no_grad(), hooks.phase(hooks.SOLVE):
        return setup.field(ti, yi)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype))


def _nan_gradients(ys: Tensor, t: Tensor, params: Sequence[Tensor], want_t: bool) -> tuple:
    warnings.warn("odeint_adjoint received a non-finite loss gradient (NaN/Inf); returning NaN "
                  "gradients without solving. Check the loss for overflow or log(0).", RuntimeWarning)
    nan = float("nan")
    return (torch.full_like(ys[0], nan), torch.full_like(t, nan) if want_t else None,
            *(torch.full_like(p, nan) for p in params))


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_state(y0: State) -> Tuple[Tensor, ...]:
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not parts or not all(isinstance(p, Tensor) and p.is_floating_point() for p in parts):
        raise TypeError("y0 must be a floating-point tensor or a tuple of them")
    if any(p.dtype != parts[0].dtype or p.device != parts[0].device for p in parts):
        raise TypeError("all parts of a tuple y0 must share one dtype and one device")
    if not bool(torch.stack([torch.isfinite(p).all() for p in parts]).all()):  # one sync per solve
        raise ValueError("y0 contains NaN or Inf; the initial state must be finite")
    return parts


def _check_time(t, y0: Tensor) -> Tuple[Tensor, List[float]]:
    """``t`` on ``y0``'s device (moved once) in at least its precision, and its values on the host
    (read once per solve, so that nothing later synchronises per segment or per sample)."""
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=y0.dtype)
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"t must be a 1-D tensor of output times (the first is the initial time), "
                         f"got shape {tuple(t.shape)}")
    if not t.is_floating_point() or torch.finfo(t.dtype).bits < torch.finfo(y0.dtype).bits:
        t = t.to(y0.dtype)  # times as precise as the state (differentiable, so time grads still flow)
    t_host = t.detach().cpu().tolist() if t.device.type != "cpu" else t.detach().tolist()
    t = t.to(y0.device)
    if not all(math.isfinite(x) for x in t_host):
        raise ValueError("t contains NaN or Inf; pass finite output times")
    d = [b - a for a, b in zip(t_host, t_host[1:])]
    if d and not (all(x > 0 for x in d) or all(x < 0 for x in d)):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {t_host}; "
                         "remove repeated times and sort them")
    return t, t_host


def _adjoint_settings(method: str, options: Optional[dict], adjoint_method: Optional[str],
                      adjoint_options: Optional[dict], seminorm: bool, backend: str) -> tuple:
    """torchdiffeq's rules for the backward options; ``adjoint_options["norm"]`` wins over ``seminorm``.

    Returns ``(adjoint_method, adjoint_options without "norm", seminorm, user norm or None)``."""
    adjoint_method = method if adjoint_method is None else adjoint_method
    if adjoint_options is None:
        if adjoint_method != method and options:
            raise ValueError("adjoint_method differs from method and options were given: the backward "
                             "options cannot be inferred from the forward's; pass adjoint_options too "
                             "(as torchdiffeq requires)")
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    adjoint_options = dict(adjoint_options)
    norm = adjoint_options.pop("norm", None)
    if norm is None:
        return adjoint_method, adjoint_options, seminorm, None
    if isinstance(norm, str):
        if norm != "seminorm":
            raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}")
        return adjoint_method, adjoint_options, True, None
    if not callable(norm):
        raise TypeError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {type(norm).__name__}")
    if backend != "torchdiffeq":
        raise ValueError(f"backend {backend!r} takes no custom adjoint norm; use backend='torchdiffeq' or "
                         "adjoint_options={'norm': 'seminorm'}")
    if seminorm:
        _warn_once("norm-over-seminorm", "odeint_adjoint: adjoint_options['norm'] is a callable, so "
                                         "seminorm=True is ignored (the user's norm wins, as in torchdiffeq)")
    return adjoint_method, adjoint_options, False, norm


def _forward_settings(structure: Structure, options: Optional[dict], backend: SolverBackend, func,
                      per_sample: bool = False, method: str = "dopri5") -> tuple:
    """The forward options without ``"norm"``, and the forward norm on the flat state (None: the
    solver's default, which equals torchdiffeq's for a tensor state).  ``per_sample``: the norm of
    :mod:`snopt_dyn.per_sample` (forward, and through it ``z`` and ``a`` of the backward)."""
    options = dict(options or {})
    user_norm = options.pop("norm", None)
    if user_norm is not None and not callable(user_norm):
        raise TypeError(f"options['norm'] must be a callable, got {type(user_norm).__name__}")
    if per_sample and backend.is_adaptive(method):
        if user_norm is not None:
            raise ValueError("options['norm'] and per_sample_error=True both set the error norm; pass one "
                             "(options={'norm': snopt_dyn.per_sample_norm} is the same as per_sample_error=True)")
        if backend.name != "torchdiffeq":
            raise ValueError(f"per_sample_error=True needs backend='torchdiffeq': backend {backend.name!r} takes no "
                             "custom error norm (its fixed-step methods need none)")
        user_norm = per_sample_norm
    if backend.name != "torchdiffeq":
        if user_norm is not None:
            raise ValueError(f"backend {backend.name!r} takes no custom norm; use backend='torchdiffeq'")
        if any(hasattr(func, name) or hasattr(func, name + "_adjoint") for name in CALLBACKS):
            _warn_once("callbacks-torchdyn", f"odeint_adjoint: backend {backend.name!r} does not call the "
                                             "func's callback_* methods; use backend='torchdiffeq' for them")
    if user_norm is None and not structure.is_tuple:
        return options, None
    return options, structure.state_norm(user_norm)


def _tolerance(name: str, value, default: float) -> float:
    """A tolerance as a float (``None``: the default); per-part tuples are not supported."""
    if value is None:
        return default
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()  # once per solve
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise TypeError(f"{name} must be one non-negative number, got {value!r}; per-part tolerances "
                        "(a tuple or tensor per state part) are not supported by the engine: pass one float")
    return float(value)


def _adjoint_params(func, adjoint_params) -> Tuple[Tensor, ...]:
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise TypeError("func is not an nn.Module: pass adjoint_params=(tensors func depends on), "
                            "or make func a module so its parameters are found")
        adjoint_params = tuple(func.parameters())
    return tuple(p for p in adjoint_params if isinstance(p, Tensor) and p.requires_grad)


def odeint_adjoint(func: Callable, y0: State, t: Union[Tensor, Sequence[float]], *, rtol: Optional[float] = 1e-7,
                   atol: Optional[float] = 1e-9, method: Optional[str] = None, options: Optional[dict] = None,
                   event_fn: Optional[Callable] = None, adjoint_rtol: Optional[float] = None,
                   adjoint_atol: Optional[float] = None, adjoint_method: Optional[str] = None,
                   adjoint_options: Optional[dict] = None, adjoint_params: Optional[Sequence[Tensor]] = None,
                   backend: str = "torchdiffeq", seminorm: bool = False, per_sample_error: bool = False,
                   max_nfe: int = DEFAULT_MAX_NFE) -> State:
    """Solve ``dz/dt = func(t, z)``, ``z(t[0]) = y0``; return ``z`` at every time in ``t`` (time first).

    A drop-in for ``torchdiffeq.odeint_adjoint``: the same arguments, defaults and error control
    (per-part RMS, maximum over parts, for the state and for the adjoint state).  Gradients come from
    the adjoint method at O(1) memory in the number of solver steps, for every parameter of ``func``
    that requires grad (or the tensors in ``adjoint_params``), for ``y0`` and for ``t``.

    Args:
        func: the vector field ``func(t, z) -> dz/dt``; an ``nn.Module`` unless ``adjoint_params``
            lists the tensors it depends on.  Its ``callback_step``/``_accept_step``/``_reject_step``
            (and ``*_adjoint`` forms, called with ``(t0, (tau, z, a, *mu), dt)``) are called as
            torchdiffeq calls them (torchdiffeq backend).
        y0: the initial state, a tensor or a tuple of tensors (0-dim parts allowed).
        t: strictly monotonic output times; the first is the initial time.  A single time returns ``y0``.
        rtol, atol, method, options: the forward solver (``method=None``: dopri5).
        event_fn: not supported (raises ``NotImplementedError``).
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: the backward solver; default to
            the forward's (options without ``"norm"``).  ``adjoint_options["norm"]`` may be
            ``"seminorm"`` or a callable, as in torchdiffeq; it wins over ``seminorm``.
        adjoint_params: tensors ``func`` depends on; default: ``func``'s parameters requiring grad.
        backend: ``"torchdiffeq"`` or ``"torchdyn"`` (its fixed-step solvers step on ``t``).
        seminorm: measure the backward error without the parameter adjoints (Kidger et al. 2020).
            Off by default, as in torchdiffeq.
        per_sample_error: error control per sample (:func:`snopt_dyn.per_sample_norm`: the largest
            per-sample RMS, dim 0 the batch) for the forward solve and the ``z``, ``a`` parts of the
            backward, so each sample meets the tolerance on its own and its output hardly depends on
            the other samples of the batch.  Off by default (torchdiffeq's one RMS over the batch).
        max_nfe: a solve that needs more field evaluations than this raises :class:`SolverError`.
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}")
    if event_fn is not None:
        raise NotImplementedError("odeint_adjoint(event_fn=...): terminal events are not supported by the "
                                  "engine; call torchdiffeq.odeint_adjoint(func, y0, t, event_fn=...) for that "
                                  "solve, or solve to a fixed horizon")
    parts = _check_state(y0)
    t, t_host = _check_time(t, parts[0])
    method = "dopri5" if method is None else method
    rtol, atol = _tolerance("rtol", rtol, 1e-7), _tolerance("atol", atol, 1e-9)
    adjoint_rtol, adjoint_atol = _tolerance("adjoint_rtol", adjoint_rtol, rtol), \
        _tolerance("adjoint_atol", adjoint_atol, atol)
    solver = get_backend(backend)
    solver.check_method(method)
    adjoint_method, adj_options, semi, user_adj_norm = _adjoint_settings(
        method, options, adjoint_method, adjoint_options, seminorm, backend)
    solver.check_method(adjoint_method)
    params = _adjoint_params(func, adjoint_params)
    structure = Structure(y0)
    fwd_options, state_norm = _forward_settings(structure, options, solver, func, bool(per_sample_error), method)
    setup = _Setup(func=func, field=_Field(func, structure, max_nfe), structure=structure, backend=solver,
                   t_host=t_host, method=method, rtol=rtol, atol=atol, options=fwd_options,
                   state_norm=state_norm, adjoint_method=adjoint_method,
                   adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                   adjoint_options=adj_options, seminorm=semi, adjoint_user_norm=user_adj_norm)
    for obs in hooks.observers():
        obs.on_forward(func, parts[0], t)
    ys = _AdjointSolve.apply(setup, structure.flatten(y0), t, *params)
    return structure.unflatten(ys, (len(t),))

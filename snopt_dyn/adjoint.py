"""The engine adjoint: O(1)-memory gradients of an ODE solve, with a sampling hook.

The forward solve keeps no autograd graph.  The backward pass integrates the augmented state
``[z, a, mu]`` (state, adjoint ``a = dL/dz``, accumulated parameter gradient) from the last output
time to the first, adding ``dL/dz(t_i)`` at every output time, so memory does not grow with the
number of solver steps.  Time gradients are exact: ``dL/dt_i = g_i . f(t_i, z_i)`` for ``i > 0``
and ``dL/dt_0 = -a(t_0+) . f(t_0, z_0)`` (the adjoint just after ``t_0``, before the jump of the
loss on ``z(t_0)`` itself, which does not depend on ``t_0``).

Observers registered in :mod:`snopt_dyn.hooks` may ask for samples ``(t_j, z(t_j), a(t_j))`` on a
backward pass; the sample times are added as extra output times of the backward solve (adaptive
torchdiffeq solvers interpolate there, so their steps do not change).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import hooks
from .errors import SolverError
from .solvers import SolverBackend, get_backend

State = Union[Tensor, Tuple[Tensor, ...]]

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


class _Structure:
    """Flattens a tensor or a tuple of tensors into one 1-D state and back."""

    def __init__(self, y0: State):
        self.is_tuple = isinstance(y0, (tuple, list))
        parts = tuple(y0) if self.is_tuple else (y0,)
        self.shapes = [p.shape for p in parts]
        self.sizes = [p.numel() for p in parts]
        self.numel = sum(self.sizes)

    def flatten(self, y: State) -> Tensor:
        if not self.is_tuple:
            return y.reshape(-1)
        return torch.cat([p.reshape(-1) for p in y])

    def unflatten(self, flat: Tensor, lead: Tuple[int, ...] = ()) -> State:
        """``flat`` has shape ``lead + (numel,)``; returns parts of shape ``lead + shape``."""
        if not self.is_tuple:
            return flat.reshape(*lead, *self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=-1)
        return tuple(p.reshape(*lead, *s) for p, s in zip(parts, self.shapes))


class _Field:
    """The user's field on the flat state: checks the output shape, counts and caps evaluations."""

    def __init__(self, func: Callable, structure: _Structure, max_nfe: int):
        self.func = func
        self.structure = structure
        self.max_nfe = max_nfe
        self.calls = 0
        self.pass_name = "forward"

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
        if self.structure.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(self.structure.shapes) or any(
                    o.shape != s for o, s in zip(out, self.structure.shapes)):
                got = [tuple(o.shape) for o in out] if isinstance(out, (tuple, list)) else type(out).__name__
                raise ValueError(f"func returned {got} but the state has shapes "
                                 f"{[tuple(s) for s in self.structure.shapes]}; the field must return "
                                 "dz/dt with the state's structure and shapes")
        elif not isinstance(out, Tensor) or out.shape != self.structure.shapes[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"func returned shape {got} but the state y0 has shape "
                             f"{tuple(self.structure.shapes[0])}; the field must return dz/dt of the "
                             "state's shape")
        return self.structure.flatten(out)


@dataclass
class _Setup:
    func: Callable
    field: _Field
    structure: _Structure
    backend: SolverBackend
    method: str
    rtol: float
    atol: float
    options: Optional[dict]
    adjoint_method: str
    adjoint_rtol: float
    adjoint_atol: float
    adjoint_options: Optional[dict]
    seminorm: bool


class _AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, y0: Tensor, t: Tensor, *params: Tensor) -> Tensor:
        setup.field.pass_name = "forward"
        setup.field.calls = 0
        with torch.no_grad(), hooks.phase(hooks.SOLVE):
            ys = setup.backend.solve(setup.field, y0, t, method=setup.method, rtol=setup.rtol,
                                     atol=setup.atol, options=setup.options)
        ctx.setup = setup
        ctx.save_for_backward(t, ys, *params)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys: Tensor):
        setup: _Setup = ctx.setup
        t, ys, *params = ctx.saved_tensors
        return (None,) + _backward(setup, t, ys, tuple(params), grad_ys, ctx.needs_input_grad)


def _backward(setup: _Setup, t: Tensor, ys: Tensor, params: Tuple[Tensor, ...], grad_ys: Tensor,
              needs_input_grad) -> tuple:
    n = ys.shape[1]
    want_t = needs_input_grad[2]
    if not torch.isfinite(grad_ys).all():
        warnings.warn("odeint_adjoint received a non-finite loss gradient (NaN/Inf); returning NaN "
                      "gradients without solving. Check the loss for overflow or log(0).", RuntimeWarning)
        nan = float("nan")
        return (torch.full_like(ys[0], nan), torch.full_like(t, nan) if want_t else None,
                *(torch.full_like(p, nan) for p in params))

    field = setup.field
    field.pass_name = "backward"
    field.calls = 0
    func = setup.func
    zeros = [torch.zeros_like(p) for p in params]
    dtype = ys.dtype

    def aug_dynamics(s: Tensor, aug: Tensor) -> Tensor:
        z, a = aug[:n], aug[n:2 * n]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            f = field(s.detach(), z)
            vjps = torch.autograd.grad(f, (z,) + params, -a, allow_unused=True)
        parts = [f.detach(), vjps[0] if vjps[0] is not None else torch.zeros_like(z)]
        parts += [(v if v is not None else zr).reshape(-1).to(dtype) for v, zr in zip(vjps[1:], zeros)]
        return torch.cat(parts)

    def field_value(i: int) -> Tensor:
        with torch.no_grad(), hooks.phase(hooks.SOLVE):
            return field(t[i], ys[i])

    # Who wants samples on this pass, and where.
    requests = []
    for obs in hooks.observers():
        spec = obs.sample_spec(func)
        if spec is not None:
            times, weight = spec.times(float(t[0]), float(t[-1]))
            requests.append((obs, times, weight, {}))

    num_params = sum(p.numel() for p in params)
    aug = torch.cat([ys[-1], grad_ys[-1], ys.new_zeros(num_params)])
    t_grad = torch.zeros_like(t) if want_t else None
    if want_t:
        t_grad[-1] = torch.dot(field_value(-1), grad_ys[-1]).to(t.dtype)

    seminorm_dims = 2 * n if setup.seminorm else None
    for i in range(len(t) - 1, 0, -1):
        lo, hi = sorted((float(t[i - 1]), float(t[i])))
        inner = []  # (time, request, sample index) strictly inside this segment
        boundary = []  # samples that fall on t[i-1]
        for r, (_, times, _, _) in enumerate(requests):
            for j, tj in enumerate(times.tolist()):
                if lo < tj < hi and not math.isclose(tj, lo) and not math.isclose(tj, hi):
                    inner.append((tj, r, j))
                elif math.isclose(tj, float(t[i - 1])) or (i == len(t) - 1 and math.isclose(tj, float(t[i]))):
                    boundary.append((tj, r, j, i - 1 if math.isclose(tj, float(t[i - 1])) else i))
        # the inner sample times, ordered along the backward direction (from t[i] to t[i-1])
        unique = sorted({x[0] for x in inner}, reverse=float(t[i]) > float(t[i - 1]))
        position = {tj: k for k, tj in enumerate(unique, start=1)}  # several observers may share times
        grid = torch.tensor([float(t[i])] + unique + [float(t[i - 1])], dtype=t.dtype, device=t.device)
        backend, method, options = setup.backend, setup.adjoint_method, setup.adjoint_options
        if unique and backend.is_adaptive(method) and not backend.interpolates:
            # torchdyn's adaptive solvers step onto every output time: sampling would shorten the
            # steps (5x the backward cost at 100 samples).  torchdiffeq's dopri5 interpolates there.
            backend, method, options = get_backend("torchdiffeq"), "dopri5", None
        with hooks.phase(hooks.SOLVE):
            sol = backend.solve(aug_dynamics, aug, grid, method=method, rtol=setup.adjoint_rtol,
                                atol=setup.adjoint_atol, options=options, seminorm_dims=seminorm_dims)
        for tj, r, j in inner:
            k = position[tj]
            requests[r][3][j] = (sol[k][:n], sol[k][n:2 * n])
        for _, r, j, idx in boundary:
            state = ys[idx]
            adj = sol[-1][n:2 * n] if idx == i - 1 else grad_ys[-1]
            requests[r][3][j] = (state, adj)
        aug = sol[-1].clone()
        aug[:n] = ys[i - 1]  # the forward value: stops drift of the reconstructed state
        if want_t:
            fval = field_value(i - 1)
            if i - 1 > 0:
                t_grad[i - 1] = torch.dot(fval, grad_ys[i - 1]).to(t.dtype)
            else:
                t_grad[0] = -torch.dot(fval, aug[n:2 * n]).to(t.dtype)
        aug[n:2 * n] += grad_ys[i - 1]

    for obs, times, weight, got in requests:
        if len(got) != len(times):  # cannot happen unless times fall outside [t0, T]
            raise RuntimeError("internal error: some sample times were not reached")
        order = range(len(times))
        states = torch.stack([got[j][0] for j in order])
        adjoints = torch.stack([got[j][1] for j in order])
        lead = (len(times),)
        batch = hooks.SampleBatch(times=times.to(t.dtype), states=setup.structure.unflatten(states, lead),
                                  adjoints=setup.structure.unflatten(adjoints, lead), weight=weight)
        with torch.enable_grad(), hooks.phase(hooks.SAMPLE):
            obs.on_samples(func, batch)

    y0_grad = aug[n:2 * n]
    param_grads, offset = [], 2 * n
    for p in params:
        param_grads.append(aug[offset:offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()
    return (y0_grad, t_grad, *param_grads)


def _check_time(t, y0: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=y0.dtype, device=y0.device)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of at least 2 times (start and end), got shape {tuple(t.shape)}")
    if not t.is_floating_point() or torch.finfo(t.dtype).bits < torch.finfo(y0.dtype).bits:
        t = t.to(y0.dtype)  # times as precise as the state (differentiable, so time grads still flow)
    if not torch.isfinite(t).all():
        raise ValueError("t contains NaN or Inf; pass finite output times")
    d = t[1:] - t[:-1]
    if not ((d > 0).all() or (d < 0).all()):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {t.tolist()}; "
                         "remove repeated times and sort them")
    return t


def odeint_adjoint(func: Callable, y0: State, t: Union[Tensor, Sequence[float]], *, method: str = "dopri5",
                   rtol: float = 1e-3, atol: float = 1e-3, backend: str = "torchdiffeq",
                   options: Optional[dict] = None, adjoint_method: Optional[str] = None,
                   adjoint_rtol: Optional[float] = None, adjoint_atol: Optional[float] = None,
                   adjoint_options: Optional[dict] = None, seminorm: bool = True,
                   adjoint_params: Optional[Sequence[Tensor]] = None,
                   max_nfe: int = DEFAULT_MAX_NFE) -> State:
    """Solve ``dz/dt = func(t, z)``, ``z(t[0]) = y0``; return ``z`` at every time in ``t`` (time first).

    Gradients come from the adjoint method at O(1) memory in the number of solver steps: for every
    parameter of ``func`` that requires grad (or the tensors in ``adjoint_params``), for ``y0``, and
    for every entry of ``t`` that requires grad.

    Args:
        func: the vector field ``func(t, z) -> dz/dt``; an ``nn.Module`` unless ``adjoint_params``
            lists the tensors it depends on.
        y0: the initial state, a tensor or a tuple of tensors.
        t: strictly monotonic output times; the first is the initial time.
        method, rtol, atol, options: the forward solver (names of the chosen ``backend``).
        backend: ``"torchdiffeq"`` or ``"torchdyn"`` (its fixed-step solvers step on ``t``).
        adjoint_method, adjoint_rtol, adjoint_atol, adjoint_options: the backward solver; default to
            the forward's.
        seminorm: measure the backward error on ``[z, a]`` only (Kidger et al. 2020); usually far
            fewer backward steps at no loss of accuracy.
        adjoint_params: tensors ``func`` depends on; default: ``func``'s parameters requiring grad.
        max_nfe: a solve that needs more field evaluations than this raises :class:`SolverError`.
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}")
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not parts or not all(isinstance(p, Tensor) and p.is_floating_point() for p in parts):
        raise TypeError("y0 must be a floating-point tensor or a tuple of them")
    if any(p.dtype != parts[0].dtype for p in parts):
        raise TypeError("all parts of a tuple y0 must share one dtype")
    for p in parts:
        if not torch.isfinite(p).all():
            raise ValueError("y0 contains NaN or Inf; the initial state must be finite")
    t = _check_time(t, parts[0])
    solver = get_backend(backend)
    solver.check_method(method)
    adjoint_method = method if adjoint_method is None else adjoint_method
    solver.check_method(adjoint_method)
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise TypeError("func is not an nn.Module: pass adjoint_params=(tensors func depends on), "
                            "or make func a module so its parameters are found")
        adjoint_params = tuple(func.parameters())
    params = tuple(p for p in adjoint_params if isinstance(p, Tensor) and p.requires_grad)
    structure = _Structure(y0)
    setup = _Setup(func=func, field=_Field(func, structure, max_nfe), structure=structure, backend=solver,
                   method=method, rtol=rtol, atol=atol, options=options, adjoint_method=adjoint_method,
                   adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
                   adjoint_atol=atol if adjoint_atol is None else adjoint_atol,
                   adjoint_options=options if adjoint_options is None else adjoint_options,
                   seminorm=seminorm)
    for obs in hooks.observers():
        obs.on_forward(func, parts[0], t)
    ys = _AdjointSolve.apply(setup, structure.flatten(y0), t, *params)
    return structure.unflatten(ys, (len(t),))

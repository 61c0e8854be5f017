"""Solver backends behind one small interface.

The engine adjoint only ever needs "solve this flat ODE and give me the state at these times", with
an error norm (torchdiffeq takes any callable; torchdyn only a seminorm on the first ``k`` entries).
``dense=True`` asks for the inner times of ``t`` as *outputs only*: the solver must take exactly the
steps it takes on ``[t[0], t[-1]]`` alone, so that sampling a backward pass never changes the
gradient.  torchdiffeq's adaptive solvers interpolate there (their dense output), its fixed-grid
solvers get their grid pinned to the endpoints (and interpolate linearly, as they do); torchdyn,
whose solvers step onto every output time, interpolates with its own dense output for dopri5;
for its other solvers the backend keeps the accepted steps of that segment (memory grows with
them, on sampled passes only) and interpolates between them (cubic).  torchdyn is imported lazily.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import SolverError

Field = Callable[[Tensor, Tensor], Tensor]


class SolverBackend:
    """A way to integrate ``dy/dt = f(t, y)`` for a 1-D (flattened) state ``y``."""

    name: str = ""

    def check_method(self, method: str) -> None:
        """Raise ``ValueError`` naming the valid methods when ``method`` is unknown."""
        raise NotImplementedError

    def is_adaptive(self, method: str) -> bool:
        raise NotImplementedError

    def solve(self, f: Field, y0: Tensor, t: Tensor, *, method: str, rtol: float, atol: float,
              options: Optional[dict], norm: Optional[Callable[[Tensor], Tensor]] = None,
              seminorm_dims: Optional[int] = None, dense: bool = False) -> Tensor:
        """Return the solution at every time in ``t`` (time first).

        ``norm`` is the error norm of adaptive steps (where the backend takes one);
        ``seminorm_dims=k`` asks a backend without custom norms for error control on ``y[:k]``;
        ``dense=True``: the inner times of ``t`` must not change the steps (see the module docstring).
        """
        raise NotImplementedError


class TorchdiffeqBackend(SolverBackend):
    """``torchdiffeq.odeint`` (any of its methods); adaptive solvers interpolate at output times."""

    name = "torchdiffeq"
    _FIXED = {"euler", "midpoint", "rk4", "explicit_adams", "implicit_adams", "fixed_adams",
              "heun2", "heun3"}

    def _methods(self):
        from torchdiffeq._impl.odeint import SOLVERS
        return SOLVERS

    def check_method(self, method: str) -> None:
        methods = self._methods()
        if method not in methods or method == "scipy_solver":
            valid = sorted(m for m in methods if m != "scipy_solver")
            raise ValueError(f"unknown method {method!r} for backend 'torchdiffeq'; choose one of {valid}")

    def is_adaptive(self, method: str) -> bool:
        return method not in self._FIXED

    def solve(self, f, y0, t, *, method, rtol, atol, options, norm=None, seminorm_dims=None, dense=False):
        from torchdiffeq._impl.odeint import odeint as odeint_impl
        options = dict(options or {})
        if norm is not None and self.is_adaptive(method):
            options["norm"] = norm
        if dense and not self.is_adaptive(method) and options.get("step_size") is None:
            options["grid_constructor"] = _endpoint_grid(options.get("grid_constructor"))
        try:
            # the implementation, not the module attribute: wrap() swaps torchdiffeq.odeint during forwards
            return odeint_impl(f, y0, t, rtol=rtol, atol=atol, method=method, options=options)
        except AssertionError as err:
            # torchdiffeq's only sign of a blow-up or NaN state is a bare assertion; name the problem.
            if "underflow in dt" not in str(err):
                raise
            raise SolverError(f"the step size underflowed ({err}): the solution is blowing up or "
                              "became NaN. Check the field and y0, or shorten the time span.") from err


class TorchdynBackend(SolverBackend):
    """``torchdyn.numerics.odeint``: adaptive solvers land on every output time; for fixed-step
    solvers the output times *are* the step grid (torchdyn's semantics)."""

    name = "torchdyn"

    def _solvers(self):
        from torchdyn.numerics.solvers.ode import SOLVER_DICT
        return SOLVER_DICT

    def check_method(self, method: str) -> None:
        solvers = self._solvers()
        if method not in solvers or method in ("alf", "AsynchronousLeapfrog", "ieuler", "implicit_euler"):
            valid = sorted(m for m in solvers if m not in ("alf", "AsynchronousLeapfrog", "ieuler", "implicit_euler"))
            raise ValueError(f"unknown or unsupported method {method!r} for backend 'torchdyn'; "
                             f"choose one of {valid}")

    def is_adaptive(self, method: str) -> bool:
        return self._solvers()[method](torch.float32).stepping_class == "adaptive"

    def solve(self, f, y0, t, *, method, rtol, atol, options, norm=None, seminorm_dims=None, dense=False):
        if options:
            raise ValueError(f"backend 'torchdyn' takes no solver options, got {sorted(options)}")
        if dense and len(t) > 2:
            if method == "dopri5":  # torchdyn's 4th-order dense output: same steps, O(1) memory
                sol = self._interpolated(f, y0, t, rtol, atol, seminorm_dims)
                if len(sol) == len(t):
                    return sol
            ends = t[[0, -1]]
            times, every = self._steps(f, y0, ends, method, rtol, atol, seminorm_dims)
            last = (times - t[-1]).abs().argmin()  # the end point exactly as an unsampled solve takes it
            return torch.cat([_interpolate(times, every, t[:-1]), every[last][None]])
        return self._outputs(f, y0, t, method, rtol, atol, seminorm_dims)

    def _outputs(self, f, y0, t, method, rtol, atol, seminorm_dims):
        from torchdyn.numerics import odeint
        from torchdyn.numerics.solvers.ode import str_to_solver
        solver = str_to_solver(method, y0.dtype)
        if not self.is_adaptive(method):
            _, sol = odeint(f, y0, t, solver)
            return sol
        seminorm = (True, seminorm_dims) if seminorm_dims is not None else (False, None)
        _, sol = odeint(f, y0, t, solver, atol=atol, rtol=rtol, seminorm=seminorm)
        if len(sol) == len(t):
            return sol
        # torchdyn records an output time only when `t + dt == T` holds exactly in floating point;
        # when the last step overshoots T by an ulp (about 2% of float32 spans) the final point is
        # dropped.  Solve again keeping every accepted step and take the nearest one to each time.
        times, every = self._steps(f, y0, t, method, rtol, atol, seminorm_dims)
        index = torch.stack([(times - ti).abs().argmin() for ti in t])
        if not torch.allclose(times[index], t, rtol=1e-5, atol=1e-6):
            raise SolverError(f"the torchdyn solver did not reach the output times {t.tolist()}")
        return every[index]

    def _interpolated(self, f, y0, t, rtol, atol, seminorm_dims):
        from torchdyn.numerics import odeint
        from torchdyn.numerics.solvers.ode import str_to_solver
        seminorm = (True, seminorm_dims) if seminorm_dims is not None else (False, None)
        _, sol = odeint(f, y0, t, str_to_solver("dopri5", y0.dtype), atol=atol, rtol=rtol, seminorm=seminorm,
                        interpolator="4th")
        return sol

    def _steps(self, f, y0, t, method, rtol, atol, seminorm_dims):
        """Every step point of the solve on ``t`` (times in ``t``'s direction, states)."""
        from torchdyn.numerics import odeint
        from torchdyn.numerics.solvers.ode import str_to_solver
        solver = str_to_solver(method, y0.dtype)
        if not self.is_adaptive(method):
            times, every = odeint(f, y0, t, solver)
            return t, every
        seminorm = (True, seminorm_dims) if seminorm_dims is not None else (False, None)
        times, every = odeint(f, y0, t, solver, atol=atol, rtol=rtol, seminorm=seminorm, return_all_eval=True)
        times = times.reshape(-1).to(t)
        # torchdyn integrates a reversed span in negated time (chosen on the device: no sync)
        return torch.where(t[-1] < t[0], -times, times), every


def _endpoint_grid(user_grid: Optional[Callable]) -> Callable:
    """A fixed-grid constructor that ignores inner output times (they are then interpolated)."""
    def grid(func, y0, t):
        ends = t[[0, -1]]
        return ends if user_grid is None else user_grid(func, y0, ends)
    return grid


def _interpolate(times: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """Values at ``query`` from step points (cubic Lagrange through the 4 nearest points, fewer
    when there are fewer); device-side only, no host synchronisation.  Points *at* a step time get
    that step's value exactly (the endpoints of a dense solve always are step points)."""
    sign = torch.where(times[-1] < times[0], -1.0, 1.0).to(times.dtype)
    u, q = times * sign, query.to(times.dtype) * sign
    k, m = len(u), min(4, len(u))
    idx = torch.searchsorted(u.contiguous(), q.contiguous())
    start = (idx - m // 2).clamp(0, k - m)
    nodes = start[:, None] + torch.arange(m, device=u.device)
    x = u[nodes]                                              # (M, m)
    diff = q[:, None, None] - x[:, None, :]                   # q - x_l
    denom = x[:, :, None] - x[:, None, :]                     # x_k - x_l
    eye = torch.eye(m, dtype=torch.bool, device=u.device)
    basis = torch.where(eye, 1.0, diff / torch.where(eye, 1.0, denom)).prod(-1)  # (M, m)
    out = (basis[..., None] * values[nodes].to(times.dtype)).sum(1).to(values.dtype)
    exact = (u[:, None] == q[None, :])
    hit = exact.any(0)
    return torch.where(hit[:, None], values[exact.to(torch.int64).argmax(0)], out)


_BACKENDS = {"torchdiffeq": TorchdiffeqBackend(), "torchdyn": TorchdynBackend()}


def get_backend(name: str) -> SolverBackend:
    """Look a backend up by name, with an error that lists the valid names."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_BACKENDS)}") from None

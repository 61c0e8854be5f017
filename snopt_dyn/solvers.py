"""Solver backends behind one small interface.

The engine adjoint only ever needs "solve this flat ODE and give me the state at these times", with
an optional seminorm that measures the error on the first ``k`` entries of the state.  Each backend
maps that request onto a library's solver; torchdyn is imported lazily.
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
    interpolates: bool = False  # adaptive solvers reach extra output times without extra steps

    def check_method(self, method: str) -> None:
        """Raise ``ValueError`` naming the valid methods when ``method`` is unknown."""
        raise NotImplementedError

    def is_adaptive(self, method: str) -> bool:
        raise NotImplementedError

    def solve(self, f: Field, y0: Tensor, t: Tensor, *, method: str, rtol: float, atol: float,
              options: Optional[dict], seminorm_dims: Optional[int] = None) -> Tensor:
        """Return the solution at every time in ``t`` (time first).

        ``seminorm_dims=k`` asks for error control on ``y[:k]`` only.
        """
        raise NotImplementedError


class TorchdiffeqBackend(SolverBackend):
    """``torchdiffeq.odeint`` (any of its methods); adaptive solvers interpolate at output times."""

    name = "torchdiffeq"
    interpolates = True
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

    def solve(self, f, y0, t, *, method, rtol, atol, options, seminorm_dims=None):
        from torchdiffeq._impl.odeint import odeint as odeint_impl
        options = dict(options or {})
        if seminorm_dims is not None and self.is_adaptive(method):
            k = seminorm_dims
            options["norm"] = lambda e: e[:k].pow(2).mean().sqrt()
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

    def solve(self, f, y0, t, *, method, rtol, atol, options, seminorm_dims=None):
        from torchdyn.numerics import odeint
        from torchdyn.numerics.solvers.ode import str_to_solver
        if options:
            raise ValueError(f"backend 'torchdyn' takes no solver options, got {sorted(options)}")
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
        times, every = odeint(f, y0, t, str_to_solver(method, y0.dtype), atol=atol, rtol=rtol,
                              seminorm=seminorm, return_all_eval=True)
        times = times.reshape(-1).to(t)
        if t[-1] < t[0]:
            times = -times  # torchdyn integrates a reversed span in negated time
        index = torch.stack([(times - ti).abs().argmin() for ti in t])
        if not torch.allclose(times[index], t, rtol=1e-5, atol=1e-6):
            raise SolverError(f"the torchdyn solver did not reach the output times {t.tolist()}")
        return every[index]


_BACKENDS = {"torchdiffeq": TorchdiffeqBackend(), "torchdyn": TorchdynBackend()}


def get_backend(name: str) -> SolverBackend:
    """Look a backend up by name, with an error that lists the valid names."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_BACKENDS)}") from None

"""torchsde's pieces that the engine's SDE adjoint reuses, behind one version check.

:mod:`snopt_dyn.sde_adjoint` runs torchsde's own numerics (contract checks, solvers, the adjoint SDE,
the reversed Brownian motion), so its outputs and gradients are torchsde's bit for bit.  Most of
these pieces are private (``torchsde._core``), so they are imported here only, lazily (torchsde is an
optional extra: ``import snopt_dyn`` never imports it), and only for the versions they were checked
against (:data:`SUPPORTED`); ``tests/test_sde_adjoint.py`` holds the contract test of every name
and signature used.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Tuple

#: torchsde versions the private pieces below were checked against: [low, high)
SUPPORTED: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((0, 2, 6), (0, 2, 7))

#: name -> the parameters each reused function must take (the contract test checks them)
SIGNATURES = {
    "check_contract": ("sde", "y0", "ts", "bm", "method", "adaptive", "options", "names", "logqp"),
    "parse_return": ("y0", "ys", "extra_solver_state", "extra", "logqp"),
    "select": ("method", "sde_type"),
    "default_adjoint_method": ("sde", "method", "adjoint_method"),
}


@dataclass(frozen=True)
class TorchsdeParts:
    """The torchsde functions and classes the engine calls (see the module docstring)."""

    version: str
    check_contract: Callable      # torchsde._core.sdeint.check_contract
    parse_return: Callable        # torchsde._core.sdeint.parse_return
    select: Callable              # torchsde._core.methods.select (method name -> solver class)
    default_adjoint_method: Callable  # torchsde._core.adjoint._select_default_adjoint_method
    AdjointSDE: type              # torchsde._core.adjoint_sde.AdjointSDE
    ReverseBrownian: type         # torchsde.ReverseBrownian
    flatten: Callable             # torchsde._core.misc.flatten
    flat_to_shape: Callable       # torchsde._core.misc.flat_to_shape
    assert_no_grad: Callable      # torchsde._core.misc.assert_no_grad
    handle_unused_kwargs: Callable
    METHODS: Any                  # torchsde.settings.METHODS
    NOISE_TYPES: Any
    SDE_TYPES: Any


def _version_tuple(version: str) -> Tuple[int, ...]:
    """The leading release numbers of ``version`` (``"0.2.6.post1"`` -> ``(0, 2, 6)``)."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def check_version(version: str) -> None:
    """Raise ``ImportError`` (naming the fix) unless ``version`` is in :data:`SUPPORTED`."""
    low, high = SUPPORTED
    if not low <= _version_tuple(version) < high:
        span = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        raise ImportError(
            f"snopt_dyn.sdeint_adjoint runs torchsde's own solvers through private torchsde modules checked "
            f"against torchsde{span}, but torchsde {version} is installed. Fix: pip install 'torchsde{span}', "
            "or solve with torchsde.sdeint_adjoint directly (inside snopt_dyn.no_interception() for a "
            "wrapped model; its layers then keep their raw gradients under SNOpt).")


@functools.lru_cache(maxsize=None)
def parts() -> TorchsdeParts:
    """Import torchsde's pieces once (``ImportError`` naming the fix when torchsde is missing or of an
    unchecked version)."""
    try:
        import torchsde
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("snopt_dyn.sdeint_adjoint needs torchsde: pip install 'torchsde==0.2.6'") from err
    check_version(getattr(torchsde, "__version__", "0"))
    from torchsde import ReverseBrownian
    from torchsde._core import adjoint as _adjoint
    from torchsde._core import methods, misc
    from torchsde._core import sdeint as _sdeint
    from torchsde._core.adjoint_sde import AdjointSDE
    from torchsde.settings import METHODS, NOISE_TYPES, SDE_TYPES
    return TorchsdeParts(
        version=torchsde.__version__, check_contract=_sdeint.check_contract, parse_return=_sdeint.parse_return,
        select=methods.select, default_adjoint_method=_adjoint._select_default_adjoint_method,
        AdjointSDE=AdjointSDE, ReverseBrownian=ReverseBrownian, flatten=misc.flatten,
        flat_to_shape=misc.flat_to_shape, assert_no_grad=misc.assert_no_grad,
        handle_unused_kwargs=misc.handle_unused_kwargs, METHODS=METHODS, NOISE_TYPES=NOISE_TYPES,
        SDE_TYPES=SDE_TYPES)


def contract_problems(found: TorchsdeParts) -> list:
    """What no longer matches the contract (names whose parameters changed); empty when all is well."""
    problems = []
    for name, expected in SIGNATURES.items():
        params = tuple(inspect.signature(getattr(found, name)).parameters)
        if params[:len(expected)] != expected:
            problems.append(f"{name}{params} (expected {expected})")
    adjoint_sde = tuple(inspect.signature(found.AdjointSDE.__init__).parameters)
    if adjoint_sde[1:4] != ("forward_sde", "params", "shapes") or not hasattr(found.AdjointSDE, "get_state"):
        problems.append(f"AdjointSDE{adjoint_sde}")
    solver = found.select(found.METHODS.midpoint, found.SDE_TYPES.stratonovich)
    if tuple(inspect.signature(solver.integrate).parameters) != ("self", "y0", "ts", "extra0") or \
            not hasattr(solver, "init_extra_solver_state"):
        problems.append("BaseSDESolver.integrate(y0, ts, extra0) / init_extra_solver_state changed")
    return problems

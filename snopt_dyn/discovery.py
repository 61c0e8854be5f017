"""Discovery: what :func:`snopt_dyn.wrap` looks at to decide what to intercept (it never imports a library).

*User code* is every module that is not part of a third-party library listed in :data:`LIBRARIES`,
snopt_dyn's own modules included: no engine or adapter module keeps a global bound to a library's
solver (the torchdiffeq adapter holds the originals in a dict), so scanning our own modules finds
only what our reference models (``snopt_dyn.models``) import, exactly as for a user's module.
torchdiffeq must be listed: its own modules call the implementation on purpose (its adjoint solves
with ``odeint`` internally), and rerouting them would send torchdiffeq's internals to the engine.
The others are listed only to keep the scan short.
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Iterator, List, Sequence, Set

from torch import nn

#: third-party libraries whose modules are never scanned or patched (by top-level package name)
LIBRARIES = frozenset({
    "torch", "torchdiffeq", "torchcde", "torchdyn", "torchsde", "torchvision", "torchaudio", "torchmetrics",
    "pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities", "numpy", "scipy", "sklearn",
    "pandas", "matplotlib", "PIL", "sympy", "_pytest", "pytest", "pluggy", "IPython", "jedi", "builtins",
    "networkx", "jinja2", "fsspec", "yaml", "tqdm", "triton", "sktime", "aeon",
})


def is_library(module_name: str) -> bool:
    return module_name.split(".", 1)[0] in LIBRARIES


def all_namespaces() -> Iterator[dict]:
    """Global namespaces of every loaded user module (see the module docstring)."""
    for name, module in list(sys.modules.items()):
        if isinstance(module, types.ModuleType) and not is_library(name):
            space = getattr(module, "__dict__", None)
            if isinstance(space, dict):
                yield space


def class_namespaces(model: nn.Module) -> Iterator[dict]:
    """Global namespaces of the user modules defining the classes of ``model``'s submodules (and their
    base classes)."""
    seen: Set[str] = set()
    for sub in model.modules():
        for cls in type(sub).__mro__:
            name = getattr(cls, "__module__", None)
            if not name or name in seen or is_library(name):
                continue
            seen.add(name)
            module = sys.modules.get(name)
            if module is not None:
                yield vars(module)


def _binds(space: dict, targets: Sequence[object]) -> bool:
    return any(value is target for value in list(space.values()) for target in targets)


def refers_to(space: dict, targets: Sequence[object]) -> bool:
    """Whether a namespace binds one of ``targets`` (a solver function or a library module), directly
    or one level down: through a function it imported from another user module (a solve in a helper),
    or a user module it imported whole (``import helpers``)."""
    if _binds(space, targets):
        return True
    for value in list(space.values()):
        if isinstance(value, types.FunctionType) and value.__globals__ is not space:
            module = value.__globals__.get("__name__", "")
            if not is_library(module) and _binds(value.__globals__, targets):
                return True
        elif isinstance(value, types.ModuleType) and not is_library(value.__name__) and value.__dict__ is not space:
            if _binds(value.__dict__, targets):
                return True
    return False


def instances(model: nn.Module, cls) -> List[nn.Module]:
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def solver_attributes(model: nn.Module, targets: Sequence[object]) -> List[str]:
    """``"<submodule>.<attribute>"`` for every instance attribute holding a solver
    (``self.odesolve = odeint_adjoint``)."""
    found = []
    for name, module in model.named_modules():
        for attr, value in list(vars(module).items()):
            if any(value is t for t in targets):
                found.append(f"{name or type(model).__name__}.{attr}")
    return found


def field_like(module: nn.Module) -> bool:
    """A user module whose ``forward`` takes two positional inputs, ``forward(t, y)``: a vector field."""
    cls = type(module)
    if is_library(cls.__module__):
        return False
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2

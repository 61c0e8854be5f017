"""Interception: how a library's solver call recognises a wrapped module, and how solver names are rerouted.

Routing is by the identity of the solve's ``func``, not by "inside a wrapped forward": :func:`mark`
puts a :class:`Route` on every submodule of a wrapped model, and a rerouted solver name (see
:func:`reroute`) sends a call to the engine exactly when its ``func`` is, or contains, a marked
module (torchcde wraps the user's field in its own ``_VectorField``).  Every other call runs the
library's own solver, unchanged.  So a solve runs on the engine wherever it is written: in
``forward``, in another method, in a helper of another module or in the training loop.

There is no per-call state to leak: a ``KeyboardInterrupt`` inside a field leaves nothing behind,
and the registry holds no model (the routes live on the modules themselves, so they pickle and die
with them).  The name patches are process-wide and stay until :func:`restore_originals`; a patched
name called with an unmarked ``func`` is the original function plus one dictionary lookup.
:func:`no_interception` turns routing off on the current thread for a block.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

from .discovery import all_namespaces

ROUTE = "_snopt_route"


@dataclass
class WrapOptions:
    """What :func:`snopt_dyn.wrap` was asked for.

    ``method``, ``rtol``, ``atol``: ``None`` keeps the user's solver and tolerances; a value overrides
    them for the forward *and* the backward (adjoint) solve.  ``seminorm``: the engine's ``seminorm``
    keyword (a call's own ``adjoint_options["norm"]`` wins over it).  ``train_terminal_time`` and
    ``terminal_time``: the trainable horizon (see :func:`snopt_dyn.wrap`).  ``per_sample_error``:
    error control per sample (:mod:`snopt_dyn.per_sample`) always (``True``), never (``False``) or
    for evaluations only (``"eval"``: solves without a gradient or with the model in eval mode).
    ``eval_tol``: rtol and atol of evaluation solves (``None`` keeps the solve's own).
    ``sde_backprop``: where a plain ``torchsde.sdeint`` the engine is not exact for runs
    (``"native"`` or ``"adjoint"``, see :func:`snopt_dyn.wrap`).
    """

    seminorm: bool = True
    method: Optional[str] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    train_terminal_time: bool = False
    terminal_time: Optional[float] = None
    per_sample_error: Union[bool, str] = "eval"
    eval_tol: Optional[float] = None
    sde_backprop: str = "native"

    def __setstate__(self, state: dict) -> None:  # models pickled before these options existed
        self.__dict__.update({"per_sample_error": "eval", "eval_tol": None, "sde_backprop": "native", **state})


class Route:
    """Stored on every submodule of a wrapped model: the options its solves run with, and the module
    holding a trainable horizon (``None`` without one).

    ``installers`` are module-level functions (pickled by reference) that put the name patches in
    place; unpickling a wrapped model in a fresh process calls them, so the copy is wrapped too.
    """

    def __init__(self, options: WrapOptions, horizon_owner: Optional[nn.Module] = None,
                 installers: Sequence[Callable[[], None]] = ()):
        self.options = options
        self.horizon_owner = horizon_owner
        self.installers = tuple(installers)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for install in self.installers:
            install()


def mark(model: nn.Module, route: Route) -> None:
    """Put ``route`` on ``model`` and every submodule (a later wrap overrides an earlier one)."""
    for module in model.modules():
        object.__setattr__(module, ROUTE, route)


def unmark(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop(ROUTE, None)


def route_of(func) -> Optional[Route]:
    """The route of a solve's ``func``: its own, or that of a module it contains; ``None`` if neither,
    or if routing is off on this thread (:func:`no_interception`)."""
    if not isinstance(func, nn.Module) or getattr(_local, "off", 0):
        return None
    route = func.__dict__.get(ROUTE)
    if route is not None:
        return route
    for module in func.modules():
        route = module.__dict__.get(ROUTE)
        if route is not None:
            return route
    return None


_local = threading.local()


@contextlib.contextmanager
def no_interception() -> Iterator[None]:
    """Inside the block (on this thread), rerouted solver names run the library's own solver, even for
    wrapped modules: ``with snopt_dyn.no_interception(): torchdiffeq.odeint_adjoint(field, y0, t)``."""
    depth = getattr(_local, "off", 0)
    _local.off = depth + 1
    try:
        yield
    finally:
        _local.off = depth


# ------------------------------------------------------------------------------- name patches
_lock = threading.RLock()
#: (id(namespace), name) -> (namespace, name, original, replacement): module globals we rebound
_patched: Dict[Tuple[int, str], Tuple[dict, str, object, object]] = {}


def reroute(pairs: Sequence[Tuple[object, object]], namespaces: Iterable[dict], track: bool = True) -> int:
    """Bind each ``replacement`` wherever its ``original`` is bound in ``namespaces``; return how many
    names were rebound.  ``track=False`` for instance dictionaries: they belong to the model (they
    pickle with it, and tracking them would keep it alive)."""
    count = 0
    with _lock:
        for space in namespaces:
            for name, value in list(space.items()):
                for original, replacement in pairs:
                    if value is original:
                        space[name] = replacement
                        count += 1
                        if track:
                            _patched[(id(space), name)] = (space, name, original, replacement)
    return count


def reroute_attributes(model: nn.Module, pairs: Sequence[Tuple[object, object]]) -> list:
    """:func:`reroute` on the instance attributes of ``model``'s submodules (``self.odesolve =
    odeint_adjoint``), untracked: they belong to the model.  Returns ``"<module>.<attr>"`` rebound."""
    rebound = []
    for name, module in model.named_modules():
        before = dict(vars(module))
        if reroute(pairs, [vars(module)], track=False):
            rebound += [f"{name or type(model).__name__}.{k}" for k, v in before.items() if vars(module)[k] is not v]
    return rebound


def restore_originals(pairs: Sequence[Tuple[object, object]], namespaces: Iterable[dict] = ()) -> None:
    """Undo :func:`reroute`: put back every tracked module global, and in ``namespaces`` every name
    bound to a replacement of ``pairs`` (modules imported after the patch bound the replacement)."""
    back = {id(replacement): original for original, replacement in pairs}
    with _lock:
        for space, name, original, replacement in _patched.values():
            if space.get(name) is replacement:
                space[name] = original
        _patched.clear()
        for space in namespaces:
            for name, value in list(space.items()):
                if id(value) in back and getattr(value, "__globals__", None) is not space:  # not its own home
                    space[name] = back[id(value)]


class SolverNames:
    """One library's solver names and our stand-ins for them (``pairs`` of ``(original, replacement)``):
    rebinds them in the library module, in every loaded user module and on a model's submodules, and
    puts them back.  An adapter keeps one and exposes its methods as its module functions."""

    def __init__(self, library: object, pairs: Sequence[Tuple[object, object]]):
        self.library, self.pairs, self.installed = library, list(pairs), False

    def _namespaces(self) -> List[dict]:
        return [vars(self.library)] + list(all_namespaces())

    def install_globals(self) -> int:
        """Rebind the names in the library itself and in every loaded user module (idempotent; modules
        imported later bind the stand-ins through the library); return how many were rebound."""
        self.installed = True
        return reroute(self.pairs, self._namespaces())

    def ensure_installed(self) -> None:
        """What an unpickled wrapped model calls: install once per process."""
        if not self.installed:
            self.install_globals()

    def install(self, model: nn.Module) -> List[str]:
        """Rebind the names (process-wide) and the solver attributes of ``model``'s submodules; return
        the attributes rebound (``"<module>.<attr>"``)."""
        self.install_globals()
        return reroute_attributes(model, self.pairs)

    def uninstall(self) -> None:
        """Put the library's own functions back everywhere (wrapped models then run natively)."""
        restore_originals(self.pairs, self._namespaces())
        self.installed = False


def patched_names() -> int:
    """How many module globals are rebound right now (for tests and diagnostics)."""
    return len(_patched)

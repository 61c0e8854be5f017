"""``snopt_dyn.wrap``: make every ODE/CDE solve inside an existing model run on the engine adjoint.

One call, no copies::

    model = snopt_dyn.wrap(model)          # the same object, same parameters, same state_dict keys
    precond = snopt_dyn.SNOpt(model)       # now sees every vector field of the model

What is recognised (detection never imports a library: it looks at classes and module globals of
libraries that the model's code has already imported):

* **torchdyn** ``NeuralODE`` instances anywhere in the model (alone, in ``nn.Sequential``, as an
  attribute, with ``Augmenter``/``DepthCat``/``DataControl``): their class is switched to an engine
  subclass (:mod:`snopt_dyn.adapters.torchdyn`).
* **torchcde** ``cdeint`` and **torchdiffeq** ``odeint``/``odeint_adjoint`` called by the model's
  code (module attribute ``torchdiffeq.odeint_adjoint(...)`` or an imported name such as
  ``from torchdiffeq import odeint_adjoint as odeint``): forward hooks on the model route those calls
  to the engine while the model's forward runs (:mod:`snopt_dyn.adapters.torchdiffeq`).
* Models that already call :func:`snopt_dyn.odeint_adjoint` need no wrap; ``wrap`` returns them
  unchanged.

The adapters are imported lazily, only for a model that needs them.

With PyTorch Lightning (torchdyn's ``NeuralODE`` is a ``LightningModule``), ``SNOpt.step()`` goes in
``on_before_optimizer_step``, which Lightning calls after ``backward`` and before
``optimizer.step()`` (and before gradient clipping)::

    class Learner(pl.LightningModule):
        def __init__(self, node):
            super().__init__()
            self.node = snopt_dyn.wrap(node)
            self.precond = snopt_dyn.SNOpt(self)    # not a module: not saved in checkpoints

        def on_before_optimizer_step(self, optimizer):
            self.precond.step()                      # rewrites .grad in place

With gradient accumulation the hook runs once per optimizer step, as ``SNOpt.step()`` expects.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Set

from torch import nn

from .terminal_time import attach_terminal_time, validate_terminal_time

SUPPORTED = (
    "snopt_dyn.wrap supports: torchdyn NeuralODE modules (alone, inside nn.Sequential, as attributes, "
    "with Augmenter/DepthCat/DataControl); modules whose code calls torchcde.cdeint; modules whose code "
    "calls torchdiffeq.odeint or torchdiffeq.odeint_adjoint (module attribute or imported name); "
    "modules calling snopt_dyn.odeint_adjoint directly need no wrap."
)

# Modules whose globals are never patched or searched (libraries, not user code).
_LIBRARY_PREFIXES = ("torch", "torchdiffeq", "torchcde", "torchdyn", "torchsde", "pytorch_lightning",
                     "lightning", "lightning_fabric", "torchmetrics", "builtins", "snopt_dyn.adapters",
                     "snopt_dyn.adjoint", "snopt_dyn.solvers", "snopt_dyn.wrapping", "snopt_dyn.hooks",
                     "snopt_dyn.preconditioner", "snopt_dyn.layers")


@dataclass
class WrapOptions:
    """What :func:`wrap` was asked for; stored on the model as ``model._snopt_wrap``.

    ``method``, ``rtol``, ``atol``: ``None`` keeps the user's solver and tolerances; a value overrides
    them for the forward *and* the backward (adjoint) solve.  ``seminorm``: error control of the
    backward solve on ``[z, a]`` only (a torchdiffeq call that passes
    ``adjoint_options={"norm": ...}`` decides for itself).  ``train_terminal_time`` and
    ``terminal_time``: the trainable horizon (see :func:`wrap`).
    """

    seminorm: bool = True
    method: Optional[str] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    train_terminal_time: bool = False
    terminal_time: Optional[float] = None


def _is_library_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _LIBRARY_PREFIXES)


def user_namespaces(model: nn.Module) -> Iterator[dict]:
    """Global namespaces (``vars(module)``) of the user modules defining the classes of ``model``'s
    submodules and their base classes; libraries (torch, torchdiffeq, ...) are skipped."""
    seen: Set[str] = set()
    for sub in model.modules():
        for cls in type(sub).__mro__:
            name = getattr(cls, "__module__", None)
            if not name or name in seen or _is_library_module(name):
                continue
            seen.add(name)
            mod = sys.modules.get(name)
            if mod is not None:
                yield vars(mod)


def _neural_ode_class():
    mod = sys.modules.get("torchdyn.core.neuralde")
    return getattr(mod, "NeuralODE", None) if mod is not None else None


def _find_neural_odes(model: nn.Module) -> List[nn.Module]:
    cls = _neural_ode_class()
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def _calls_torchdiffeq(model: nn.Module) -> Optional[str]:
    """``"torchcde"`` or ``"torchdiffeq"`` when the model's code refers to these libraries' solvers."""
    tde = sys.modules.get("torchdiffeq")
    cde = sys.modules.get("torchcde")
    targets = []
    if tde is not None:
        targets += [tde, getattr(tde, "odeint", None), getattr(tde, "odeint_adjoint", None)]
        impl = sys.modules.get("torchdiffeq._impl.odeint"), sys.modules.get("torchdiffeq._impl.adjoint")
        targets += [getattr(impl[0], "odeint", None), getattr(impl[1], "odeint_adjoint", None)]
    cde_targets = [cde, getattr(cde, "cdeint", None)] if cde is not None else []
    targets = [t for t in targets if t is not None]
    cde_targets = [t for t in cde_targets if t is not None]
    if not targets and not cde_targets:
        return None
    found = None
    for ns in user_namespaces(model):
        for value in list(ns.values()):
            if any(value is c for c in cde_targets):
                return "torchcde"
            if any(value is t for t in targets):
                found = "torchdiffeq"
    if found is None and _already_hooked(model):
        found = "torchdiffeq"
    return found


def _already_hooked(model: nn.Module) -> bool:
    """Wrapped before (wrap called again, possibly from inside a running forward)."""
    adapter = sys.modules.get("snopt_dyn.adapters.torchdiffeq")
    return adapter is not None and adapter.is_wrapped(model)


def _is_sde(model: nn.Module) -> bool:
    """torchsde's convention: an SDE module declares ``noise_type`` and ``sde_type``."""
    return any(hasattr(m, "noise_type") and hasattr(m, "sde_type") for m in model.modules())


def _calls_engine(model: nn.Module) -> bool:
    pkg = sys.modules.get("snopt_dyn")
    engine = getattr(pkg, "odeint_adjoint", None)
    for ns in user_namespaces(model):
        for value in list(ns.values()):
            if value is pkg or (engine is not None and value is engine):
                return True
    return False


def wrap(model: nn.Module, *, seminorm: bool = True, method: Optional[str] = None,
         rtol: Optional[float] = None, atol: Optional[float] = None,
         train_terminal_time: bool = False, terminal_time: Optional[float] = None) -> nn.Module:
    """Make every ODE/CDE solve inside ``model`` run on the engine adjoint; return ``model`` itself.

    * **No copies**: the same object comes back, with the same parameter tensors (an optimizer made
      before ``wrap`` keeps working) and the same ``state_dict`` keys (old checkpoints load).
      Wrapping twice is harmless (the options of the last call apply).  The wrapped model pickles.
    * **Same numbers**: the user's solver and tolerances are kept (unless overridden here), so the
      forward output equals the unwrapped model's to float tolerance, and gradients equal the
      library's own adjoint's to solver tolerance; memory is O(1) in the number of solver steps and
      the vector fields become visible to :class:`snopt_dyn.SNOpt`.

    Mechanisms: torchdyn ``NeuralODE`` instances switch class to an engine subclass (whatever
    ``sensitivity`` they were built with, the engine computes the gradients); models calling
    torchcde/torchdiffeq get forward hooks that route ``torchdiffeq.odeint``/``odeint_adjoint`` (and
    the names the model's modules imported) to the engine *while the model's forward runs*.  See
    :mod:`snopt_dyn.adapters.torchdiffeq` for the exact rules and the thread-safety notes.

    Args:
        model: an ``nn.Module`` (see :data:`SUPPORTED`).
        seminorm: backward error control on ``[z, a]`` only (Kidger et al. 2020).
        method, rtol, atol: override the solver / tolerances of every solve (forward and backward);
            ``None`` keeps the user's.
        train_terminal_time, terminal_time: make the horizon trainable: every torchdyn ``NeuralODE``
            (or, for a torchdiffeq model with one solve per forward, the model itself) gets a
            ``terminal_time`` buffer T (default: the NeuralODE's ``t_span`` length; required for
            torchdiffeq models), and its time grid is stretched to ``[t0, t0 + T]``.  T gets its
            exact gradient from the engine adjoint, is saved in ``state_dict`` but is not in
            ``parameters()``: train it with :class:`snopt_dyn.TerminalTimeOptimizer`.  A Neural CDE
            (horizon fixed by the data) or a torchsde model raises ``ValueError``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no supported ODE/CDE solve was found in ``model`` (the message lists what is
            supported), or a torchdyn NeuralODE uses something the engine cannot run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects an nn.Module, got {type(model).__name__}. {SUPPORTED}")
    options = WrapOptions(seminorm=bool(seminorm), method=method, rtol=rtol, atol=atol,
                          train_terminal_time=bool(train_terminal_time), terminal_time=terminal_time)

    if train_terminal_time and _is_sde(model):
        raise ValueError("train_terminal_time=True is not supported for torchsde models: torchsde's "
                         "sdeint does not accept output times that require grad (a trainable T would "
                         "need a time rescaling of the SDE); wrap it without train_terminal_time")
    nodes = _find_neural_odes(model)
    family = _calls_torchdiffeq(model)
    if not nodes and family is None:
        if _calls_engine(model):
            if train_terminal_time:
                raise ValueError("train_terminal_time=True needs a torchdyn NeuralODE or a torchdiffeq model; "
                                 "a model calling snopt_dyn.odeint_adjoint directly can make T trainable "
                                 "itself with snopt_dyn.terminal_time.attach_terminal_time / terminal_time_leaf")
            return model  # already on the engine: nothing to do
        raise ValueError(f"no ODE/CDE solve found in {type(model).__name__}. {SUPPORTED}")

    if train_terminal_time:
        if family == "torchcde":
            raise ValueError("train_terminal_time=True makes no sense for a Neural CDE: its terminal time "
                             "is the end of the data's time interval, fixed by the data; wrap it without "
                             "train_terminal_time")
        if family == "torchdiffeq" and not nodes and terminal_time is None:
            raise ValueError("train_terminal_time=True on a torchdiffeq model needs terminal_time=<the "
                             "horizon its solve uses now>, so that wrapping does not change its numbers")
        if terminal_time is not None:
            validate_terminal_time(terminal_time)

    if nodes:
        from .adapters import torchdyn as _torchdyn
        for node in nodes:
            _torchdyn.check(node, options)  # all checks before changing anything
        for node in nodes:
            _torchdyn.wrap_neural_ode(node, options)
    if family == "torchcde":
        from .adapters import torchcde as _torchcde
        _torchcde.install(model, options)
    elif family is not None:
        from .adapters import torchdiffeq as _torchdiffeq
        _torchdiffeq.install(model, options)
        if train_terminal_time and not nodes:  # NeuralODEs hold their own horizons
            attach_terminal_time(model, terminal_time)
    object.__setattr__(model, "_snopt_wrap", options)
    return model

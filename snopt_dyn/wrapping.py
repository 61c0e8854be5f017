"""``snopt_dyn.wrap``: make every ODE/CDE solve of an existing model run on the engine adjoint.

One call, no copies::

    model = snopt_dyn.wrap(model)          # the same object, same parameters, same state_dict keys
    precond = snopt_dyn.SNOpt(model)       # now sees every vector field of the model

What is intercepted (detection never imports a library: it looks at classes, instance attributes and
module globals of libraries the user's code has already imported, see :mod:`snopt_dyn.discovery`):

* **torchdyn** ``NeuralODE`` instances anywhere in the model (alone, in ``nn.Sequential``, as an
  attribute, with ``Augmenter``/``DepthCat``/``DataControl``): their class is switched to an engine
  subclass (:mod:`snopt_dyn.adapters.torchdyn`).
* **torchdiffeq** ``odeint``/``odeint_adjoint`` and **torchcde** ``cdeint`` solves whose ``func``
  is, or contains, a module of the wrapped model -- wherever the call is written: in ``forward``, in
  another method, in a helper function of another module, in the training loop
  (``wrap(func); odeint(func, y0, t)``), through a solver stored as an attribute
  (``self.odesolve = odeint_adjoint``) or through an imported name
  (``from torchdiffeq import odeint_adjoint as odeint``).  See :mod:`snopt_dyn.interception`.
* **torchsde** ``sdeint_adjoint`` solves whose ``sde`` is, or contains, a module of a model holding
  an SDE module (``noise_type`` and ``sde_type`` attributes), and plain ``sdeint`` where the engine is
  exact or asked for (``sde_backprop``); see :mod:`snopt_dyn.adapters.torchsde`.
* Models that already call :func:`snopt_dyn.odeint_adjoint` need no wrap; ``wrap`` returns them
  unchanged.

Without interception: call :func:`snopt_dyn.odeint_adjoint` (torchdiffeq's signature) instead of
wrapping, or run a block natively with :func:`no_interception`; :func:`restore_originals` puts
torchdiffeq's own functions back everywhere.  With PyTorch Lightning use
:class:`snopt_dyn.lightning.SNOptCallback`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Union

from torch import nn

from . import discovery
from .interception import Route, WrapOptions, mark, no_interception
from .per_sample import check_mode
from .terminal_time import attach_terminal_time, validate_terminal_time

__all__ = ["wrap", "restore_originals", "no_interception", "WrapOptions", "SUPPORTED"]

SUPPORTED = (
    "snopt_dyn.wrap supports: torchdyn NeuralODE modules (alone, inside nn.Sequential, as attributes, "
    "with Augmenter/DepthCat/DataControl); torchcde.cdeint and torchdiffeq.odeint / torchdiffeq.odeint_adjoint "
    "solves whose func is, or contains, a module of the wrapped model (called from forward, another method, "
    "a helper or the training loop; module attribute, imported name or solver stored as an attribute); "
    "torchsde.sdeint_adjoint (and, where exact, torchsde.sdeint) solves of a torchsde SDE module of the model; "
    "modules calling snopt_dyn.odeint_adjoint directly need no wrap."
)


@dataclass
class _Survey:
    """What :func:`wrap` found in a model."""

    nodes: List[nn.Module] = field(default_factory=list)
    family: Optional[str] = None  # "torchcde", "torchdiffeq", "torchsde" or None
    evidence: List[str] = field(default_factory=list)
    calls_engine: bool = False
    sde: bool = False  # holds a torchsde SDE module: its sdeint/sdeint_adjoint solves are routed too


def _solver_targets():
    """(torchdiffeq objects, torchcde objects) a model's code may refer to: modules, solvers, stand-ins."""
    tde, cde = sys.modules.get("torchdiffeq"), sys.modules.get("torchcde")
    adapter = sys.modules.get("snopt_dyn.adapters.torchdiffeq")
    tde_targets = [tde] if tde is not None else []
    for name in ("torchdiffeq._impl.odeint", "torchdiffeq._impl.adjoint"):
        impl = sys.modules.get(name)
        tde_targets += [getattr(impl, name.rsplit(".", 1)[1], None)] if impl is not None else []
    if adapter is not None:
        tde_targets += list(adapter.REPLACEMENTS.values())
    cde_targets = [cde, getattr(cde, "cdeint", None)] if cde is not None else []
    return [t for t in tde_targets if t is not None], [t for t in cde_targets if t is not None]


def _survey(model: nn.Module) -> _Survey:
    survey = _Survey()
    torchdyn = sys.modules.get("torchdyn.core.neuralde")
    survey.nodes = discovery.instances(model, getattr(torchdyn, "NeuralODE", None))
    tde, cde = _solver_targets()
    if tde or cde:
        spaces = list(discovery.class_namespaces(model))
        if any(discovery.refers_to(s, cde) for s in spaces):
            survey.evidence.append("a torchcde.cdeint call in its code")
            survey.family = "torchcde"
        elif any(discovery.refers_to(s, tde) for s in spaces):
            survey.evidence.append("a torchdiffeq solver call in its code")
        solvers = [t for t in tde if callable(t)]
        survey.evidence += [f"solver attribute {a}" for a in discovery.solver_attributes(model, solvers)]
        survey.evidence += [f"vector field {n or type(model).__name__}" for n, m in model.named_modules()
                            if discovery.field_like(m)][:1]
        if survey.evidence and survey.family is None:
            survey.family = "torchdiffeq"
    survey.sde = _is_sde(model)
    if survey.sde and survey.family is None:
        survey.evidence.append("a torchsde SDE module")
        survey.family = "torchsde"
    pkg = sys.modules.get("snopt_dyn")
    engine = [t for t in (pkg, getattr(pkg, "odeint_adjoint", None)) if t is not None]
    survey.calls_engine = any(discovery.refers_to(s, engine) for s in discovery.class_namespaces(model))
    return survey


def _is_sde(model: nn.Module) -> bool:
    """torchsde's convention: an SDE module declares ``noise_type`` and ``sde_type``."""
    return any(hasattr(m, "noise_type") and hasattr(m, "sde_type") for m in model.modules())


def _check_no_torchdyn_sde(model: nn.Module) -> None:
    neuralde = sys.modules.get("torchdyn.core.neuralde")
    found = discovery.instances(model, getattr(neuralde, "NeuralSDE", None))
    if found:
        raise ValueError("snopt_dyn.wrap does not support torchdyn's NeuralSDE (torchdyn 1.0.6's is broken upstream: "
                         "it raises TypeError at construction). Fix: write the SDE as a torchsde module (attributes "
                         "noise_type and sde_type, methods f and g) and solve it with torchsde.sdeint_adjoint; "
                         "wrap then routes that solve to the engine")


def _tolerance(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"eval_tol must be a positive number or None, got {value!r}")
    return float(value)


def _nothing_found(model: nn.Module) -> ValueError:
    return ValueError(
        f"snopt_dyn.wrap found nothing to intercept in {type(model).__name__}: no torchdyn NeuralODE, no "
        "torchdiffeq/torchcde solver referred to by the code of its classes, no solver stored as an attribute, "
        "and no module with forward(t, y). Fix: wrap the vector field you pass to odeint/odeint_adjoint/cdeint "
        "(or a model that contains it), or call snopt_dyn.odeint_adjoint(func, y0, t) yourself. " + SUPPORTED)


def _check_terminal_time(model: nn.Module, survey: _Survey, options: WrapOptions) -> None:
    """Refuse a trainable horizon where it cannot work, before anything is changed."""
    if not options.train_terminal_time:
        return
    if _is_sde(model):
        raise ValueError("train_terminal_time=True is not supported for torchsde models: torchsde's "
                         "sdeint does not accept output times that require grad (a trainable T would "
                         "need a time rescaling of the SDE); wrap it without train_terminal_time")
    if survey.family == "torchcde":
        raise ValueError("train_terminal_time=True makes no sense for a Neural CDE: its terminal time "
                         "is the end of the data's time interval, fixed by the data; wrap it without "
                         "train_terminal_time")
    if survey.family is None and not survey.nodes:
        raise ValueError("train_terminal_time=True needs a torchdyn NeuralODE or a torchdiffeq model; "
                         "a model calling snopt_dyn.odeint_adjoint directly can make T trainable "
                         "itself with snopt_dyn.terminal_time.attach_terminal_time / terminal_time_leaf")
    if survey.family == "torchdiffeq" and not survey.nodes and options.terminal_time is None:
        raise ValueError("train_terminal_time=True on a torchdiffeq model needs terminal_time=<the "
                         "horizon its solve uses now>, so that wrapping does not change its numbers")
    if options.terminal_time is not None:
        validate_terminal_time(options.terminal_time)


def _wrap_neural_odes(nodes: List[nn.Module], options: WrapOptions) -> None:
    from .adapters import torchdyn as adapter
    for node in nodes:
        adapter.check(node, options)  # all checks before changing anything
    for node in nodes:
        adapter.wrap_neural_ode(node, options)


def _route_solver_calls(model: nn.Module, survey: _Survey, options: WrapOptions) -> None:
    """Install the torchdiffeq stand-ins and mark every submodule with the route its solves take."""
    from .adapters import torchdiffeq as adapter
    adapter.install(model)
    installers = (adapter.ensure_installed,)
    if survey.sde or (survey.family == "torchcde" and "torchsde" in sys.modules):  # torchcde's backend="torchsde"
        from .adapters import torchsde as sde_adapter
        sde_adapter.install(model)
        installers += (sde_adapter.ensure_installed,)
    owner = None
    if options.train_terminal_time and not survey.nodes:  # NeuralODEs hold their own horizons
        attach_terminal_time(model, options.terminal_time)
        owner = model
        if not discovery.field_like(model):  # a field solved from the loop: every solve is "a forward"
            adapter.count_solves_per_forward(model)
    mark(model, Route(options, owner, installers=installers))


def wrap(model: nn.Module, *, seminorm: bool = True, method: Optional[str] = None,
         rtol: Optional[float] = None, atol: Optional[float] = None,
         train_terminal_time: bool = False, terminal_time: Optional[float] = None,
         per_sample_error: Union[bool, str] = "eval", eval_tol: Optional[float] = None,
         sde_backprop: str = "native") -> nn.Module:
    """Make every ODE/CDE solve of ``model`` run on the engine adjoint; return ``model`` itself.

    * **No copies**: the same object comes back, with the same parameter tensors (an optimizer made
      before ``wrap`` keeps working) and the same ``state_dict`` keys (old checkpoints load).
      Wrapping twice is harmless (the options of the last call apply).  The wrapped model pickles.
    * **Same numbers**: the user's solver and tolerances are kept (unless overridden here), so the
      forward output equals the unwrapped model's to float tolerance, and gradients equal the
      library's own adjoint's to solver tolerance; memory is O(1) in the number of solver steps and
      the vector fields become visible to :class:`snopt_dyn.SNOpt`.
    * **No cost per field call**: no hook is put on the model's modules (a trainable horizon of a
      torchdiffeq model adds one forward pre-hook on ``model``, not on its field).

    Args:
        model: an ``nn.Module`` (see :data:`SUPPORTED`): the model, or the vector field itself.
        seminorm: the engine's ``seminorm`` (backward error control on ``[z, a]`` only); a solve's own
            ``adjoint_options={"norm": ...}`` wins over it.
        method, rtol, atol: override the solver / tolerances of every solve (forward and backward);
            ``None`` keeps the user's.
        train_terminal_time, terminal_time: make the horizon trainable: every torchdyn ``NeuralODE``
            (or, for a torchdiffeq model with one solve per forward, the model itself) gets a
            ``terminal_time`` buffer T (default: the NeuralODE's ``t_span`` length; required for
            torchdiffeq models), and its time grid is stretched to ``[t0, t0 + T]``.  T gets its
            exact gradient from the engine adjoint, is saved in ``state_dict`` but is not in
            ``parameters()``: train it with :class:`snopt_dyn.TerminalTimeOptimizer`.  A Neural CDE
            (horizon fixed by the data) or a torchsde model raises ``ValueError``.
        per_sample_error: error control per sample (:func:`snopt_dyn.per_sample_norm`, forward and
            backward) so that a sample's output does not depend on the others in its batch beyond
            the tolerance: ``"eval"`` (default) for solves without a gradient or with the model in
            eval mode -- predictions -- and torchdiffeq's one norm over the batch for training (the
            per-sample norm costs more steps there, see BENCHMARKS.md); ``True`` always, ``False``
            never.  torchdyn's adaptive solvers take no custom norm: ``True`` raises for them, and
            ``"eval"`` warns once that their predictions stay batch-dependent.
        eval_tol: rtol and atol of evaluation solves (no gradient, or the model in eval mode);
            ``None`` keeps the solve's own.  The steps are still shared by a batch, so a sample's
            output moves with its companions by about the global error; a tighter tolerance for
            predictions is what bounds that (BENCHMARKS.md: batch dependence).
        sde_backprop: what a plain ``torchsde.sdeint`` (back-propagation through the solver) on a wrapped
            SDE does when the engine is not exact for it (any method but fixed-step reversible Heun):
            ``"native"`` (default) keeps torchsde's solver and says once that SNOpt leaves those layers
            raw; ``"adjoint"`` runs the engine's stochastic adjoint (gradients then approximate
            back-propagation's to the step size).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: nothing to intercept was found in ``model`` (the message names the fix), a
            torchdyn NeuralODE uses something the engine cannot run, or the model holds a torchdyn
            NeuralSDE (write it as a torchsde SDE instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects an nn.Module, got {type(model).__name__}. {SUPPORTED}")
    options = WrapOptions(seminorm=bool(seminorm), method=method, rtol=rtol, atol=atol,
                          train_terminal_time=bool(train_terminal_time), terminal_time=terminal_time,
                          per_sample_error=check_mode(per_sample_error), eval_tol=_tolerance(eval_tol),
                          sde_backprop=sde_backprop)
    if sde_backprop not in ("native", "adjoint"):
        raise ValueError(f"sde_backprop must be 'native' or 'adjoint', got {sde_backprop!r}")
    _check_no_torchdyn_sde(model)
    survey = _survey(model)
    _check_terminal_time(model, survey, options)
    if not survey.nodes and survey.family is None:
        if survey.calls_engine:
            return model  # already on the engine: nothing to do
        raise _nothing_found(model)
    if survey.nodes:
        _wrap_neural_odes(survey.nodes, options)
    if survey.family is not None:
        _route_solver_calls(model, survey, options)
    object.__setattr__(model, "_snopt_wrap", options)
    return model


def restore_originals() -> None:
    """Put torchdiffeq's own ``odeint``/``odeint_adjoint`` (and torchsde's ``sdeint``/``sdeint_adjoint``)
    back everywhere wrap rebound them (module globals; solver attributes stay rebound on wrapped
    models).  Wrapped torchdiffeq/torchcde/torchsde models then run natively until the next
    :func:`wrap`; torchdyn NeuralODEs stay on the engine."""
    for name in ("snopt_dyn.adapters.torchdiffeq", "snopt_dyn.adapters.torchsde"):
        adapter = sys.modules.get(name)
        if adapter is not None:
            adapter.uninstall()

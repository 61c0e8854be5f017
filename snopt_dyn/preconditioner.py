"""SNOpt: time-sampled Kronecker factors and the eigenvalue-corrected update (docs/ARCHITECTURE.md).

Use it between ``loss.backward()`` and ``optimizer.step()`` of any torch optimizer::

    precond = SNOpt(model)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward()
        precond.step()          # rewrites .grad in place
        opt.step()

Every ``update_freq``-th iteration is a *refresh*: the coming backward pass samples each vector
field solved by the engine at J times, and ``step()`` rebuilds the factors A and G and their
eigenbases.  Other iterations only precondition, at the cost of four small matmuls per layer.
What is done in the eigenbasis is the ``rule``: today's eigenvalue-corrected division
(``"ekfac"``) or Adam (``"adam"``); factor averaging, a burn-in and weight decay apply to both.
Gradient accumulation works: K backward passes (``loss / K`` each) before one ``step()`` give the
update of one batch K times the size.

This class is the observer of the engine and the orchestration of one step; the pieces live in
:mod:`snopt_dyn.curvature` (how G is scaled: :mod:`snopt_dyn.curvature.statistics`).  It also observes
SDE solves of :func:`snopt_dyn.sdeint_adjoint` (``sde_sample_spec``/``on_sde_samples``): drift and
(Stratonovich) diffusion layers get factors by our extension of SNOpt to SDEs
(:mod:`snopt_dyn.curvature.sde_pairing`, not the paper's method).
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import hooks
from .curvature import (basis_change, burn_in, checkpoint, distributed, eigen_adam, ekfac, factor_average,
                        sde_pairing, trust_region, warm_basis, weight_decay)
from .curvature.batching import backward_pass_id
from .curvature.lifecycle import LayerHooks, foreign_solver
from .curvature.pairing import Sampler
from .curvature.statistics import Factors, LayerStats, output_scale, stat_dtype
from .errors import NonFiniteError
from .layers import LayerKind, kind_of

Schedule = Union[float, Callable[[int], float]]

#: The default second-moment rule of today's rule (see :mod:`snopt_dyn.curvature.ekfac`).
DEFAULT_MOMENT = "paper"
#: The update rules: ``"ekfac"`` (:mod:`snopt_dyn.curvature.ekfac`, today's) and ``"adam"``
#: (:mod:`snopt_dyn.curvature.eigen_adam`, Adam in the eigenbasis).
RULES = ("ekfac", "adam")
DEFAULT_RULE = "ekfac"
#: The second-moment rules each update rule takes (the first is its default).
RULE_MOMENTS = {"ekfac": (DEFAULT_MOMENT,) + tuple(m for m in ekfac.MOMENTS if m != DEFAULT_MOMENT),
                "adam": eigen_adam.MOMENTS}
#: Options only ``rule="adam"`` reads (given to another rule with a non-default value: ``ValueError``).
ADAM_ONLY = ("beta1", "beta2", "eps", "relative_eps", "power", "bias_correction", "first_basis",
             "first_moments")
#: what ``first_basis`` does with the moments of its steps in the weights' own basis at the first basis
FIRST_MOMENTS = ("carry", "restart")


def layer_options(*layers: Optional[Dict[str, object]]) -> Dict[str, object]:
    """SNOpt keyword arguments from defaults and overrides, later layers winning.  A layer that sets
    another ``rule`` than ``"adam"`` drops the Adam-only options of the layers before it (a task's
    ``first_basis``, say), and one that sets ``first_basis=0`` drops their ``first_moments``: they
    configure what that layer turns off, and ``SNOpt`` refuses them without it.  The same option
    given in that layer itself is kept, and refused."""
    merged: Dict[str, object] = {}
    for layer in layers:
        layer = layer or {}
        dropped = ADAM_ONLY if layer.get("rule", "adam") != "adam" else ()
        dropped += ("first_moments",) if layer.get("first_basis", 1) == 0 else ()
        merged = {k: v for k, v in merged.items() if k not in dropped}
        merged.update(layer)
    return merged


#: The role of a layer reaching the diffusion of an Itô SDE: left raw (see :mod:`snopt_dyn.curvature.sde_pairing`).
ITO_DIFFUSION = "ito-diffusion"


@dataclass
class _LayerState:
    """The preconditioner's persistent state for one layer."""

    name: str
    module: nn.Module
    kind: LayerKind
    role: str = "unknown"  # "ode" (ODE/SDE fields), "static", "foreign", "ito-diffusion" (raw) or "unknown"
    a: Optional[Tensor] = None  # the factors the bases were built from (averaged with factor_ema)
    g: Optional[Tensor] = None
    weight: float = 0.0  # the total weight of the running average of a and g
    u_a: Optional[Tensor] = None
    u_g: Optional[Tensor] = None
    m2: Optional[Tensor] = None  # the second moment in the eigenbasis (v of rule="adam")
    m1: Optional[Tensor] = None  # the first moment in the eigenbasis (rule="adam", beta1 > 0)
    t: int = 0  # steps since the moments of rule="adam" were created (bias correction)
    batch: float = 1  # the effective batch of the last refresh (all ranks, all micro-batches)
    mult: float = 1  # J samples (or k calls) times locations: F ≈ mult · A ⊗ G
    samples: int = 0
    warned: bool = False
    checked: bool = False  # looked for another library's solver on the stack this refresh
    foreign: Optional[str] = None
    ode: LayerStats = None
    static: LayerStats = None


def _number(name: str, value, open_low: bool, high: float = math.inf) -> float:
    """``value`` as a finite float in ``(0, high)`` (``open_low``) or ``[0, high)``, else ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and (v > 0 if open_low else v >= 0) and v < high):
        bounds = "a finite number > 0" if open_low else f"in [0, {high:g})"
        raise ValueError(f"SNOpt: {name} must be {bounds}, got {value!r}")
    return v


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SNOpt: {name} must be a positive integer, got {value!r}")
    return value


class SNOpt(hooks.EngineObserver):
    """Second-order preconditioner for models whose ODE solves run on :func:`snopt_dyn.odeint_adjoint`
    (and SDE solves on :func:`snopt_dyn.sdeint_adjoint`, see ``sde_noise``).

    Args:
        model: the model; may not have run yet.  Its ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``
            layers inside vector fields get time-sampled factors; the others (encoders, heads) get
            ordinary K-FAC factors unless ``static_layers=False``.
        damping: ε added to the second moment in the eigenbasis (paper: 0.03–0.1); > 0.
        update_freq: iterations between refreshes of factors and eigenbases.
        alpha: running-average weight of the second moment for ``moment="paper"``, in [0, 1).
        sample_step: quadrature step Δ of the time samples; or give ``num_samples`` (J per solve).
            Default: 10 samples per solve.
        loss_reduction: ``"mean"`` (PyTorch's default) or ``"sum"``: how the loss combines the
            batch.  With ``"sum"`` on the summed loss every preconditioned gradient is exactly
            ``B`` (the batch size) times the one of ``"mean"`` on the mean loss (with gradient
            accumulation, sum the micro-batch losses without dividing by K).
        rule: the update in the eigenbasis.  ``"ekfac"`` (default, today's rule,
            :mod:`snopt_dyn.curvature.ekfac`): ``P ⊘ (m2 + damping)``, ``P`` the rotated gradient.
            ``"adam"`` (:mod:`snopt_dyn.curvature.eigen_adam`): Adam in the eigenbasis,
            ``m̂ ⊘ (v̂^power + eps)`` with first and second moments of ``P`` updated every step,
            bias-corrected, and carried into every new basis as SOAP does.  Its base optimizer is
            plain SGD (momentum 0), whose ``lr`` then plays Adam's learning rate (e.g. 1e-3-3e-2,
            not today's 0.1).
        moment: how the second moment is formed.  For ``rule="ekfac"``: ``"paper"`` (default; the
            SNOpt code's running rule), ``"per_sample"`` (true EKFAC) or ``"kfac"``; see
            :mod:`snopt_dyn.curvature.ekfac`.  On the digits check of
            ``tests/test_preconditioner.py`` (60 iterations, 3 seeds) ``"paper"``'s median final
            training loss was 0.13 against 0.30 for ``"per_sample"`` and 0.71 for ``"kfac"``.  For
            ``rule="adam"``: ``"adam"`` (default; Adam's ``v``, from zero) or ``"paper"`` (today's
            ``m2``, reset to the Kronecker eigenvalues at every rebuild, running with ``alpha``).
        beta1, beta2: ``rule="adam"``'s moment decays (``beta2`` for ``moment="adam"`` only), in
            [0, 1); default Adam's 0.9, 0.999 (SOAP uses 0.95, 0.95).  ``beta1=0``: no momentum.
        eps: ``rule="adam"``'s ε, > 0 (a number or a function of the step).  Default: 1e-8 with
            ``moment="adam"`` (Adam's), ``damping`` with ``moment="paper"``.
        relative_eps: ``rule="adam"``'s scale-free ε: ``relative_eps · mean(v̂^power)`` of each layer
            is added to the denominator, damping the eigen-directions that carry almost no gradient
            (Adam's early steps are about ``±lr`` in every coordinate).  Default 0 (off): measured at
            0.3 on the Neural CDE it did not transfer (BENCHMARKS.md §6, seventh round).
        power: ``rule="adam"``'s power ``p`` of ``v̂`` in [1/2, 1] (1/2: Adam; 1: today's power).
        bias_correction: ``rule="adam"``'s bias correction of the moments that start at zero.
        weight_decay: decoupled weight decay for every rule
            (:mod:`snopt_dyn.curvature.weight_decay`): ``update + weight_decay · W`` is written into
            ``.grad``, so the base SGD at rate ``lr`` takes AdamW's ``W -= lr·(update + wd·W)``.
            Default 0.
        factor_ema: the factors as a running average across refreshes, weight of the past in
            [0, 1) (:mod:`snopt_dyn.curvature.factor_average`); default 0: each refresh's own batch.
        sde_noise: the Brownian increments of the diffusion statistics of SDE fields solved by
            :func:`snopt_dyn.sdeint_adjoint` (our extension of SNOpt's factors to SDEs,
            :mod:`snopt_dyn.curvature.sde_pairing`): ``"path"`` (default; the solve's own ``ΔW_j``, so
            the paired products sum to the gradient) or ``"fresh"`` (``√Δ_j · ε`` drawn anew, in the
            statistics only).  Drift layers of every SDE and diffusion layers of Stratonovich SDEs are
            preconditioned; layers reaching the diffusion of an Itô SDE keep their raw gradient
            (role ``"ito-diffusion"``, said once).
        eigh_every: a full eigendecomposition on every ``eigh_every``-th basis rebuild; the rebuilds
            in between refine the current basis by one power iteration + QR on the (averaged)
            factors (SOAP's cheap update, :mod:`snopt_dyn.curvature.warm_basis`).  Default 1: always.
        burn_in: ``K >= 1`` iterations that only gather factors before the first basis is built (no
            step for the preconditioned layers: their ``.grad`` is zeroed, as in SOAP's first step
            and kfac-jax's burn-in); from then on every basis is built *after* the update of the
            iteration that sampled it, so no update uses a basis containing its own batch (SOAP's
            order; :mod:`snopt_dyn.curvature.burn_in`).  Default 0: today's order.
        first_basis: ``rule="adam"``: ``D >= 1`` iterations of Adam in the weights' own basis (no
            sampling) before the first basis is built at iteration ``D`` (with ``burn_in``, its
            gathering starts there); the moments are carried into that basis, or restarted there
            (``first_moments``).  Default 0: a basis from iteration 0 on.  With the moments carried,
            10 lost 20 points on one UCR set; restarted, 10 is the main job's timeseries and latent
            default (BENCHMARKS.md §6, ninth and tenth rounds).
        first_moments: what ``first_basis`` does with its Adam moments at the first eigenbasis:
            ``"carry"`` (default) rotates them into it, as every later rebuild does; ``"restart"``
            starts both at zero there (with a new bias-correction count), so the eigenbasis gets the
            early steps of a fresh Adam run from the warmed-up weights.  Why: the carried second
            moment, spread over the eigen-coordinates, damps the weak ones (BENCHMARKS.md §6).
        batch_size: the batch size of every solve, where the rule of
            :mod:`snopt_dyn.curvature.batching` cannot find it.
        autograd_uses: also count the vector-Jacobian products that the field itself takes through
            a layer (``torch.autograd.grad`` inside the field: CNF trace estimators, energy-based /
            Hamiltonian fields) as uses of that layer (there ``W`` acts as ``Wᵀ δy``).  Without it
            the factors see only the forward calls and miss that part of the gradient (measured
            99% of the trace term's gradient of a CNF layer); with it the per-sample gradients
            are exact.  Costs one more hook per layer on refresh iterations.
        static_layers: precondition layers outside vector fields too.
        skip: names (as in ``model.named_modules()``) or types of layers to leave untouched.
        raise_on_nonfinite: raise :class:`NonFiniteError` instead of warning on NaN/Inf.
        kl_clip: a trust region on the step (K-FAC's KL clip, see
            :mod:`snopt_dyn.curvature.trust_region`): preconditioned gradients ``p = F⁻¹g`` are
            scaled down so that the step's curvature form ``lr² pᵀFp`` (twice its KL, to second
            order) is at most ``kl_clip``.  Default ``None``: no clip (the paper's update).
        lr: the base optimizer's learning rate, needed by ``kl_clip``: the optimizer itself (its
            first group's rate is read at every step, so schedules are followed), a number, or a
            function of the step.

    Layers of other kinds (``nn.GRUCell``, norms, free parameters) keep their raw gradient; give
    them an optimizer of their own, e.g. ``torch.optim.Adam(precond.unpreconditioned_parameters())``
    next to ``torch.optim.SGD(precond.preconditioned_parameters())``.

    ``damping``, ``alpha``, ``eps`` may be numbers or callables of the step count.  ``SNOpt`` cannot be
    copied or pickled (it is bound to its model): save ``state_dict()`` instead.
    """

    def __init__(self, model: nn.Module, *, damping: Schedule = 0.05, update_freq: int = 100,
                 alpha: Schedule = 0.75, sample_step: Optional[float] = None,
                 num_samples: Optional[int] = None, loss_reduction: str = "mean",
                 moment: Optional[str] = None, batch_size: Optional[int] = None,
                 autograd_uses: bool = False, static_layers: bool = True, skip: Iterable[Union[str, type]] = (),
                 raise_on_nonfinite: bool = False, kl_clip: Optional[float] = None,
                 lr: Optional[trust_region.LearningRate] = None, rule: str = DEFAULT_RULE,
                 beta1: float = 0.9, beta2: float = 0.999, eps: Optional[Schedule] = None, power: float = 0.5,
                 relative_eps: float = 0.0, bias_correction: bool = True, weight_decay: float = 0.0, factor_ema: float = 0.0,
                 eigh_every: int = 1, burn_in: int = 0, first_basis: int = 0,
                 first_moments: str = FIRST_MOMENTS[0], sde_noise: str = sde_pairing.SDE_NOISE[0]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SNOpt needs an nn.Module, got {type(model).__name__}")
        moment = RULE_MOMENTS.get(rule, (DEFAULT_MOMENT,))[0] if moment is None else moment
        self.check_options(damping=damping, update_freq=update_freq, alpha=alpha, sample_step=sample_step,
                           num_samples=num_samples, loss_reduction=loss_reduction, moment=moment,
                           batch_size=batch_size, rule=rule, beta1=beta1, beta2=beta2, eps=eps, power=power,
                           relative_eps=relative_eps, bias_correction=bias_correction, weight_decay=weight_decay, factor_ema=factor_ema,
                           eigh_every=eigh_every, burn_in=burn_in, first_basis=first_basis,
                           first_moments=first_moments, sde_noise=sde_noise)
        trust_region.check(kl_clip, lr)
        self.rule, self.beta1, self.beta2, self.eps, self.power = rule, float(beta1), float(beta2), eps, float(power)
        self.bias_correction, self.weight_decay = bool(bias_correction), float(weight_decay)
        self.relative_eps = float(relative_eps)
        self.factor_ema, self.eigh_every, self.burn_in = float(factor_ema), eigh_every, burn_in
        self.first_basis, self.first_moments = first_basis, first_moments
        self.kl_clip, self.lr = kl_clip, lr
        self.last_clip: Optional[Tensor] = None  # ν of the last step (a tensor: reading it syncs)
        self.sample_spec_ = hooks.SampleSpec(step=float(sample_step)) if sample_step is not None else \
            hooks.SampleSpec(count=num_samples if num_samples is not None else 10)
        self.damping, self.alpha, self.update_freq = damping, alpha, update_freq
        self.loss_reduction, self.static_layers, self.moment = loss_reduction, static_layers, moment
        self.raise_on_nonfinite = raise_on_nonfinite
        self.sde_noise = sde_noise
        self._noise: Dict[torch.device, torch.Generator] = {}  # sde_noise="fresh": private generators
        self._warned_sde: set = set()  # the SDE notes said once: "foreign-torchsde", "ito"
        self.steps = self.refreshes = self.last_samples = 0
        self.step_time = self.total_step_time = 0.0
        self._layers: Dict[nn.Module, _LayerState] = self._find_layers(model, skip)
        mine = {id(p) for st in self._layers.values() for p in st.module.parameters(recurse=False)}
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
        self._sampler = Sampler(loss_reduction, batch_size, bool(autograd_uses))
        self._sampled = False  # whether any sampling evaluation ran in this refresh iteration
        self._warned_copies = False
        self._clear_stats()
        self._fields: "weakref.WeakSet" = weakref.WeakSet()
        self._hooks = LayerHooks(self, self._layers, pre_hooks=bool(autograd_uses))
        self._handle = hooks.register_observer(self)
        self._hooks.set_active(self.refreshing)

    @staticmethod
    def check_options(**options) -> None:
        """``ValueError`` (``TypeError`` for an unknown name) on a bad keyword argument of ``SNOpt``,
        without a model: the main job checks ``snopt[...]`` specs with it before any run starts."""
        known = set(inspect.signature(SNOpt.__init__).parameters) - {"self", "model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"SNOpt has no option {', '.join(map(repr, unknown))}; its options are "
                            f"{', '.join(sorted(known))}")
        get = options.get
        if "update_freq" in options:
            _positive_int("update_freq", get("update_freq"))
        if "damping" in options and not callable(get("damping")):
            _number("damping", get("damping"), open_low=True)
        if "alpha" in options and not callable(get("alpha")):
            _number("alpha", get("alpha"), open_low=False, high=1.0)
        if get("loss_reduction", "mean") not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {get('loss_reduction')!r}")
        rule = get("rule", DEFAULT_RULE)
        if rule not in RULES:
            raise ValueError(f"SNOpt: rule must be one of {RULES}, got {rule!r}")
        if get("moment") is not None and get("moment") not in RULE_MOMENTS[rule]:
            raise ValueError(f"moment must be one of {RULE_MOMENTS[rule]} with rule={rule!r}, got {get('moment')!r}")
        defaults = {k: v.default for k, v in inspect.signature(SNOpt.__init__).parameters.items()}
        ignored = [k for k in ADAM_ONLY if k in options and rule != "adam" and options[k] != defaults[k]]
        if ignored:
            raise ValueError(f"SNOpt: {', '.join(ignored)} belong(s) to rule='adam' (Adam in the eigenbasis); "
                             f"today's rule (rule={rule!r}) would ignore it: add rule='adam', or leave it out")
        if get("sample_step") is not None and get("num_samples") is not None:
            raise ValueError("give sample_step or num_samples, not both")
        if get("num_samples") is not None:
            _positive_int("num_samples", get("num_samples"))
        if get("sample_step") is not None:
            _number("sample_step", get("sample_step"), open_low=True)
        if get("batch_size") is not None:
            _positive_int("batch_size", get("batch_size"))
        for name in ("beta1", "beta2", "factor_ema"):
            if name in options:
                _number(name, get(name), open_low=False, high=1.0)
        if get("eps") is not None and not callable(get("eps")):
            _number("eps", get("eps"), open_low=True)
        if "relative_eps" in options:
            _number("relative_eps", get("relative_eps"), open_low=False)
        if "power" in options and not 0.5 <= _number("power", get("power"), open_low=True) <= 1:
            raise ValueError(f"SNOpt: power must be in [0.5, 1] (1/2: Adam, 1: today's rule), got {get('power')!r}")
        if "bias_correction" in options and not isinstance(get("bias_correction"), bool):
            raise ValueError(f"SNOpt: bias_correction must be True or False, got {get('bias_correction')!r}")
        if "weight_decay" in options:
            _number("weight_decay", get("weight_decay"), open_low=False)
        if get("sde_noise", sde_pairing.SDE_NOISE[0]) not in sde_pairing.SDE_NOISE:
            raise ValueError(f"SNOpt: sde_noise must be one of {sde_pairing.SDE_NOISE}, got {get('sde_noise')!r}")
        if "eigh_every" in options:
            _positive_int("eigh_every", get("eigh_every"))
        for name in ("burn_in", "first_basis"):
            if name in options and (isinstance(get(name), bool) or not isinstance(get(name), int) or get(name) < 0):
                raise ValueError(f"SNOpt: {name} must be an integer >= 0, got {get(name)!r}")
        if get("first_basis", 0) and (get("moment") or "adam") != "adam":
            raise ValueError("SNOpt: first_basis (Adam in the weights' own basis before the first eigenbasis) "
                             "needs rule='adam' with moment='adam': moment='paper' has no second moment without a "
                             "basis (its layers would keep their raw gradient); leave moment out, or first_basis")
        if get("first_basis", 0) and get("loss_reduction", "mean") == "sum":
            raise ValueError("SNOpt: first_basis needs loss_reduction='mean': before the first basis there are no "
                             "statistics to count the batch a summed loss adds up, so the update could not be B "
                             "times the mean loss's; divide the loss by the batch size, or leave first_basis out")
        if get("first_moments", FIRST_MOMENTS[0]) not in FIRST_MOMENTS:
            raise ValueError(f"SNOpt: first_moments must be one of {FIRST_MOMENTS}, got {get('first_moments')!r}")
        if get("first_moments", FIRST_MOMENTS[0]) != FIRST_MOMENTS[0] and not get("first_basis", 0):
            raise ValueError("SNOpt: first_moments says what first_basis does with its moments at the first "
                             "eigenbasis; without first_basis there are none: add first_basis=D, or leave "
                             "first_moments out")

    @staticmethod
    def _find_layers(model: nn.Module, skip) -> Dict[nn.Module, _LayerState]:
        skip_names = {s for s in skip if isinstance(s, str)}
        skip_types = tuple(s for s in skip if isinstance(s, type))
        layers, unsupported = {}, []
        for name, module in model.named_modules():
            if name in skip_names or (skip_types and isinstance(module, skip_types)):
                continue
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            kind, why = kind_of(module)
            if kind is None:
                unsupported.append(f"{name or '<model>'} ({why})")
            elif module.weight.requires_grad:
                layers[module] = _LayerState(name=name, module=module, kind=kind)
        if unsupported:
            warnings.warn("SNOpt leaves these layers to the base optimizer (unsupported kinds; only "
                          "nn.Linear, nn.Conv1d, nn.Conv2d are preconditioned): " + ", ".join(unsupported)
                          + ". They get their raw gradient at the base optimizer's rate; to train them with "
                          "Adam instead, build torch.optim.Adam(precond.unpreconditioned_parameters()) next "
                          "to the base optimizer over precond.preconditioned_parameters().",
                          UserWarning, stacklevel=3)
        return layers

    def preconditioned_parameters(self) -> List[nn.Parameter]:
        """The weights and biases of the layers SNOpt preconditions (for the base optimizer)."""
        return [p for st in self._layers.values() for p in st.module.parameters(recurse=False) if p.requires_grad]

    def unpreconditioned_parameters(self) -> List[nn.Parameter]:
        """The model's other trainable parameters (unsupported layer kinds, skipped layers, free
        parameters): their gradients are never changed by SNOpt; they may use an optimizer of their own."""
        return list(self._others)

    def remove(self) -> None:
        """Detach from the model and the engine (the model keeps working without it)."""
        self._hooks.remove()
        self._handle.remove()

    def __deepcopy__(self, memo):
        raise TypeError("SNOpt cannot be deep-copied: a copy would keep preconditioning the original "
                        "model. Build SNOpt(copied_model) and load precond.state_dict() into it.")

    def __reduce_ex__(self, protocol):
        raise TypeError("SNOpt cannot be pickled: it is bound to its model. Save precond.state_dict() "
                        "(with the model's state_dict) and load it into SNOpt(model) after unpickling.")

    # ----------------------------------------------------------------------------- engine hooks
    @property
    def refreshing(self) -> bool:
        """Whether the current iteration (the one before the next ``step()``) is a refresh: it
        samples curvature statistics (every ``update_freq``-th, and every burn-in iteration)."""
        return burn_in.gathers(self.steps, self.burn_in, self.update_freq, self.first_basis)

    def _owns(self, func) -> bool:
        if func in self._fields:
            return True
        mods = list(func.modules()) if isinstance(func, nn.Module) else ()
        if any(m in self._layers for m in mods):
            self._fields.add(func)
            for m in mods:
                if m in self._layers:
                    self._layers[m].role = "ode"
            return True
        return False

    def on_forward(self, func, y0, t) -> None:
        self._owns(func)

    def sample_spec(self, func) -> Optional[hooks.SampleSpec]:
        return self.sample_spec_ if self.refreshing and self._owns(func) else None

    def on_samples(self, func, batch: hooks.SampleBatch) -> None:
        self._sampled = True
        self._sampler.run(func, batch, self._add_ode, self._disconnected)

    def sde_sample_spec(self, sde) -> Optional[hooks.SampleSpec]:
        """SDE solves of :func:`snopt_dyn.sdeint_adjoint` (:mod:`snopt_dyn.sde_sampling`): samples on
        refresh iterations for an SDE module holding registered layers.  No role is set here: the SDE
        module is often the whole model (encoder, read-out), so a layer's role follows the uses it gets."""
        if not (self.refreshing and isinstance(sde, nn.Module)):
            return None
        return self.sample_spec_ if any(m in self._layers for m in sde.modules()) else None

    def on_sde_samples(self, sde, batch) -> None:
        self._sampled = True
        generator = None
        if self.sde_noise == "fresh":
            device = batch.increments.device
            if device not in self._noise:
                self._noise[device] = torch.Generator(device=device).manual_seed(0)
            generator = self._noise[device]
        self._ito_raw |= sde_pairing.run(self._sampler, batch, self._add_ode, self._disconnected, self.sde_noise,
                                         generator)

    @property
    def sampling_nfe(self) -> int:
        """Extra field evaluations spent on sampling (cumulative)."""
        return self._sampler.evaluations

    def _add_ode(self, module: nn.Module, x: Tensor, g: Tensor, pass_id: int, evaluation: int) -> None:
        self._layers[module].ode.add(x, g, pass_id, evaluation)

    def _disconnected(self, module: nn.Module) -> None:
        self._layers[module].ode.disconnected += 1

    def _on_layer_forward(self, module: nn.Module, x: Tensor, out: Tensor) -> Optional[Tensor]:
        st = self._layers.get(module)
        if st is None:
            return self._warn_copy(module)
        phase = hooks.current_phase()
        if phase == hooks.SAMPLE:
            return self._sampler.record(module, st.kind, x, out)
        if phase != hooks.OUTSIDE or not self.refreshing or st.role == "ode":
            return None
        if not st.checked:
            st.checked = True
            st.foreign = foreign_solver()
        if st.foreign or not self.static_layers or not torch.is_grad_enabled() or not out.requires_grad:
            return None
        rows = st.kind.input_rows(module, x.detach()).to(stat_dtype(x.dtype))
        scale = output_scale(self.loss_reduction, rows.shape[0])
        stats = st.static
        out.register_hook(lambda g: stats.add(rows, st.kind.output_rows(module, g.detach()).to(rows.dtype) * scale,
                                              backward_pass_id()))
        return out.clone()

    def _on_layer_input(self, module: nn.Module, x: Tensor) -> Optional[Tensor]:
        st = self._layers.get(module)
        if st is None or hooks.current_phase() != hooks.SAMPLE:
            return None
        return self._sampler.tap_input(module, st.kind, x)

    def _warn_copy(self, module: nn.Module) -> None:
        if not self._warned_copies:
            self._warned_copies = True
            warnings.warn(f"SNOpt saw a call of a {type(module).__name__} it did not register (a copy of a "
                          "model layer, as nn.DataParallel replicas are); such calls are ignored and the "
                          "layer keeps its raw gradient. Use DistributedDataParallel (one process per "
                          "device), or build SNOpt on the module that runs.", UserWarning, stacklevel=3)
        return None

    # ----------------------------------------------------------------------------- the update
    @torch.no_grad()
    def step(self) -> None:
        """Precondition the gradients in place; on refresh iterations rebuild the factors first
        (with ``burn_in``: gather them first, rebuild the bases after the update)."""
        start = time.perf_counter()
        try:
            self._step()
        finally:
            self.step_time = time.perf_counter() - start
            self.total_step_time += self.step_time

    def _hyper(self) -> Tuple[float, float]:
        damping = self.damping(self.steps) if callable(self.damping) else self.damping
        alpha = self.alpha(self.steps) if callable(self.alpha) else self.alpha
        return _number("damping", damping, open_low=True), _number("alpha", alpha, open_low=False, high=1.0)

    def _adam_hyper(self, damping: float, alpha: float) -> eigen_adam.Hyper:
        eps = self.eps(self.steps) if callable(self.eps) else self.eps
        if eps is None:
            eps = damping if self.moment == "paper" else 1e-8
        return eigen_adam.Hyper(beta1=self.beta1, beta2=self.beta2, eps=_number("eps", eps, open_low=True),
                                power=self.power, bias_correction=self.bias_correction, moment=self.moment,
                                alpha=alpha, relative_eps=self.relative_eps)

    def _step(self) -> None:
        refresh = self.refreshing
        rebuild = refresh and burn_in.rebuilds(self.steps, self.burn_in, self.update_freq, self.first_basis)
        damping, alpha = self._hyper()
        layers = list(self._layers.values())
        grads = {st.module: st.kind.grad_matrix(st.module) for st in layers}
        factors: Dict[nn.Module, Factors] = {}
        if refresh:
            for st in layers:
                if st.module in self._ito_raw and not st.foreign:
                    st.role = ITO_DIFFUSION  # reaches an Itô diffusion: left raw
                    continue
                stats = st.ode if st.ode.uses else st.static
                f = stats.finalize(self.loss_reduction) if not st.foreign else None
                if st.foreign:
                    st.role = "foreign"
                elif f is not None:
                    factors[st.module] = f
                    st.role = "ode" if stats is st.ode else "static"
        bad = self._nonfinite_names(grads, factors)
        if bad:
            self._clear_stats()
            return self._nonfinite(bad)
        entries = self._gather(layers, factors) if refresh else None
        deferred = burn_in.deferred(self.burn_in)
        if rebuild and not deferred:
            self._rebuild(layers, entries)
        self._clear_stats()
        if burn_in.in_burn_in(self.steps, self.burn_in, self.first_basis):
            self._hold_still(layers, grads)
        else:
            self._set_grads(self._updates(layers, grads, damping, alpha))
        if rebuild and deferred:
            self._rebuild(layers, entries)
        self.steps += 1
        self._hooks.set_active(self.refreshing)

    def _updates(self, layers: List[_LayerState], grads: dict, damping: float, alpha: float):
        """``(layer, raw, preconditioned)`` for every layer the rule preconditions this step."""
        adam = self._adam_hyper(damping, alpha) if self.rule == "adam" else None
        updates = []
        for st in layers:
            grad = grads[st.module]
            if grad is None or (st.u_a is None and not self._identity_adam()):
                continue
            self._follow(st, grad)
            mean_factor = st.batch if self.loss_reduction == "sum" else 1.0
            if adam is None:
                running = (alpha, st.batch, mean_factor) if self.moment == "paper" else None
                new = ekfac.precondition(grad.to(st.u_a.dtype), st.u_g, st.u_a, st.m2, damping, running)
            else:
                dtype = stat_dtype(grad.dtype)
                self._start_moments(st, grad, dtype)
                st.t += 1
                new = eigen_adam.precondition(grad.to(dtype), st.u_g, st.u_a, st.m1, st.m2, st.t, adam,
                                              st.batch, mean_factor)
            updates.append((st, grad, new))
        return updates

    @staticmethod
    def _hold_still(layers: List[_LayerState], grads: dict) -> None:
        """Burn-in: the preconditioned layers take no step (zero ``.grad``, no weight decay), as in
        SOAP's first step and kfac-jax's burn-in; their gradients only enter the factors."""
        for st in layers:
            if grads[st.module] is not None:
                st.kind.set_grad(st.module, torch.zeros_like(grads[st.module]))

    def _identity_adam(self) -> bool:
        """Whether a layer without a basis (no statistics) runs Adam in the identity basis."""
        return self.rule == "adam" and self.moment == "adam"

    def _start_moments(self, st: _LayerState, grad: Tensor, dtype: torch.dtype) -> None:
        """Zero moments (and step count) for ``rule="adam"`` where a layer has none yet."""
        if st.m2 is None:  # moment="adam" only: "paper" gets m2 at every rebuild
            st.m2 = torch.zeros(grad.shape, dtype=dtype, device=grad.device)
            st.m1, st.t = None, 0
        if self.beta1 > 0 and st.m1 is None:
            st.m1 = torch.zeros(grad.shape, dtype=dtype, device=grad.device)
            st.t = 0

    def _set_grads(self, updates: List[Tuple[_LayerState, Tensor, Tensor]]) -> None:
        """Write the preconditioned gradients, scaled by the KL clip's ``ν`` when one is set."""
        if self.kl_clip is not None and updates:
            lr = trust_region.current_lr(self.lr, self.steps)
            self.last_clip = trust_region.scale([g for _, g, _ in updates], [n for _, _, n in updates],
                                                self.kl_clip, lr)
            updates = [(st, g, n * self.last_clip.to(n.dtype)) for st, g, n in updates]
        for st, _, new in updates:
            st.kind.set_grad(st.module, new)
        if self.weight_decay:
            weight_decay.apply(self.preconditioned_parameters(), self.weight_decay)

    def _nonfinite_names(self, grads: dict, factors: Dict[nn.Module, Factors]) -> List[str]:
        """Names of layers with NaN/Inf gradients or factors; one host sync when all is finite."""
        checked = [(self._layers[m].name, g) for m, g in grads.items() if g is not None]
        checked += [(self._layers[m].name, t) for m, f in factors.items() for t in (f.a, f.g, *f.per_sample)]
        if not checked:
            return []
        flags = torch.stack([torch.isfinite(t).all().to(checked[0][1].device) for _, t in checked])
        if bool(flags.all()):
            return []
        return sorted({name for (name, _), ok in zip(checked, flags.tolist()) if not ok})

    def _nonfinite(self, names: List[str]) -> None:
        msg = (f"SNOpt.step saw NaN/Inf in the gradients or curvature statistics of {', '.join(names)}; "
               ".grad and the preconditioner state were left untouched. Lower the learning rate, check "
               "the loss, or clip gradients.")
        if self.raise_on_nonfinite:
            raise NonFiniteError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _gather(self, layers: List[_LayerState], factors: Dict[nn.Module, Factors]) -> List[Optional[Factors]]:
        """This iteration's factors, averaged over ranks and into each layer's running average
        (:mod:`snopt_dyn.curvature.factor_average`); a layer without statistics loses its basis."""
        entries = [factors.get(st.module) for st in layers]
        if distributed.world_size() > 1 and layers:
            shapes = [(s["u_a"][0], s["u_g"][0]) for s in map(checkpoint.layer_shapes, layers)]
            entries = distributed.average_factors(entries, shapes, layers[0].module.weight.device)
        decay = 1.0 if burn_in.in_burn_in(self.steps, self.burn_in, self.first_basis) else self.factor_ema
        self.last_samples = 0
        sde_notes: Dict[str, List[str]] = {"foreign-torchsde": [], "ito": []}
        for st, f in zip(layers, entries):
            if f is None:
                st.a = st.g = st.u_a = st.u_g = st.m2 = st.m1 = None
                st.weight, st.t = 0.0, 0
                if st.foreign == "torchsde" or st.role == ITO_DIFFUSION:
                    sde_notes["foreign-torchsde" if st.foreign else "ito"].append(st.name)
                else:
                    self._warn_no_stats(st)
                continue
            (st.a, st.g, st.mult), st.weight = self._blend(st, f, decay)
            st.batch = f.batch
            st.samples = len(st.ode.evaluations) // max(1, len(st.ode.passes)) if st.role == "ode" else 0
            self.last_samples = max(self.last_samples, st.samples)
        self._warn_sde(sde_notes)
        return entries

    @staticmethod
    def _blend(st: _LayerState, f: Factors, decay: float):
        if st.a is None or decay == 0:
            return (f.a, f.g, f.mult), 1.0
        if st.a.device != f.a.device or st.a.dtype != f.a.dtype:
            st.a, st.g = st.a.to(f.a), st.g.to(f.g)
        a, weight = factor_average.blend(st.a, st.weight, f.a, decay)
        g, _ = factor_average.blend(st.g, st.weight, f.g, decay)
        mult, _ = factor_average.blend(st.mult, st.weight, f.mult, decay)
        return (a, g, mult), weight

    def _rebuild(self, layers: List[_LayerState], entries: List[Optional[Factors]]) -> None:
        """New eigenbases from the (averaged) factors; the moments are reset or carried into them."""
        full = self.refreshes % self.eigh_every == 0
        self.refreshes += 1
        moments = []
        for st, f in zip(layers, entries):
            if f is None or st.a is None:
                continue
            old_g, old_a = st.u_g, st.u_a
            if full or old_a is None:
                s_a, st.u_a = ekfac.eigh(st.a, st.name)
                s_g, st.u_g = ekfac.eigh(st.g, st.name)
            else:
                s_a, st.u_a = warm_basis.power_qr(st.a, old_a)
                s_g, st.u_g = warm_basis.power_qr(st.g, old_g)
            self._new_moments(st, ekfac.kronecker_moment(s_g, s_a, st.mult), old_g, old_a)
            if self.moment == "per_sample":
                moments.append((st, ekfac.per_sample_sums(st.u_g, st.u_a, f.per_sample)))
        if moments and distributed.world_size() > 1:
            reduced = distributed.sum_moments([m for _, m in moments])
            moments = [(st, r) for (st, _), r in zip(moments, reduced)]
        for st, (total, count) in moments:
            st.m2 = total / count

    def _new_moments(self, st: _LayerState, kronecker: Tensor, old_g: Optional[Tensor],
                     old_a: Optional[Tensor]) -> None:
        """The second moment in the new basis: the Kronecker eigenvalues, or (``rule="adam"``,
        ``moment="adam"``) the old one carried over; a first moment is always carried over
        (:mod:`snopt_dyn.curvature.basis_change`); ``first_moments="restart"`` drops them at the first."""
        carry_v = self.rule == "adam" and self.moment == "adam"
        if old_a is None and self.first_basis and self.first_moments == "restart":
            st.m1 = st.m2 = None  # zeros and a new step count at the next update
            return
        if st.m1 is None and not (carry_v and st.m2 is not None):
            st.m2 = None if carry_v else kronecker
            return
        r_g, r_a = basis_change.rotation(st.u_g, old_g), basis_change.rotation(st.u_a, old_a)
        if st.m1 is not None:
            st.m1 = basis_change.carry_first(st.m1, r_g, r_a)
        st.m2 = basis_change.carry_second(st.m2, r_g, r_a) if carry_v else kronecker

    def _follow(self, st: _LayerState, grad: Tensor) -> None:
        """Move the layer's state to its gradient's device and statistics dtype (after
        ``model.to(...)`` or ``.double()``)."""
        dtype = stat_dtype(grad.dtype)
        ref = next((t for t in (st.u_a, st.m2, st.m1) if t is not None), None)
        if ref is not None and (ref.device != grad.device or ref.dtype != dtype):
            for key in ("u_a", "u_g", "m2", "m1", "a", "g"):
                t = getattr(st, key)
                if t is not None:
                    setattr(st, key, t.to(grad.device, dtype))

    def _warn_sde(self, notes: Dict[str, List[str]]) -> None:
        """Say once (per SNOpt) which SDE layers keep their raw gradient, why, and the fix."""
        keeps = "get plain Adam's update (the identity basis)" if self._identity_adam() else "keep their raw gradients"
        texts = {
            "foreign-torchsde": "are evaluated by torchsde's own solver (a torchsde.sdeint call that snopt_dyn.wrap "
                                "leaves native, or a model that is not wrapped), not by the snopt_dyn engine; no "
                                "Kronecker factors are built from another library's solver. Fix: solve with "
                                "torchsde.sdeint_adjoint on the wrapped model (or snopt_dyn.sdeint_adjoint), or "
                                "snopt_dyn.wrap(model, sde_backprop='adjoint') to route plain torchsde.sdeint to "
                                "the engine's stochastic adjoint (method='reversible_heun' is routed exactly)",
            "ito": "reach the diffusion of an Itô SDE: their gradient has Itô-Stratonovich correction terms "
                   "(through dg/dz · g) that SNOpt's SDE rows a ⊙ ΔW do not describe, so they are not "
                   "preconditioned (drift-only layers of the same SDE are). Fix: write the SDE as a Stratonovich "
                   "SDE (sde_type='stratonovich', drift f - ½ Σ_k (∂g_k/∂z) g_k) to precondition them",
        }
        for key, names in notes.items():
            if names and key not in self._warned_sde:
                self._warned_sde.add(key)
                warnings.warn(f"SNOpt: layers {', '.join(map(repr, names))} {texts[key]}; they {keeps}.",
                              UserWarning, stacklevel=5)

    def _warn_no_stats(self, st: _LayerState) -> None:
        if st.warned:
            return
        st.warned = True
        if st.foreign:
            why = (f"is evaluated by {st.foreign}'s own solver, not by the snopt_dyn engine; no Kronecker "
                   "factors are built from another solver's evaluations. Fix: snopt_dyn.wrap(model), or "
                   "solve with snopt_dyn.odeint_adjoint")
        elif st.role == "ode" and st.ode.disconnected and not st.ode.uses:
            why = ("is in a vector field solved by the engine, but its output does not reach the field's "
                   "value (it is used only through autograd inside the field, as the energy of a "
                   "Hamiltonian/energy-based field whose value is the energy's gradient); its forward "
                   "calls alone cannot describe it. Fix: SNOpt(..., autograd_uses=True) counts the "
                   "field's own vector-Jacobian products through the layer")
        elif st.role == "ode" and self._sampled:
            why = "is in a vector field solved by the engine but was not called in its sampling evaluations"
        elif st.role == "ode":
            why = ("is in a vector field solved by the engine, but no backward pass of such a solve ran in "
                   "this refresh iteration (was loss.backward() called before step(), with grad enabled?)")
        else:
            why = ("received no curvature statistics: it was not used with grad enabled in the forward and "
                   "backward pass of this refresh iteration")
        keeps = "gets plain Adam's update (the identity basis)" if self._identity_adam() else "keeps its raw gradient"
        warnings.warn(f"SNOpt: layer {st.name!r} {why}; it {keeps}.", UserWarning, stacklevel=5)

    def _clear_stats(self) -> None:
        keep = self.moment == "per_sample"
        for st in self._layers.values():
            st.ode, st.static = LayerStats(keep), LayerStats(keep)
            st.checked, st.foreign = False, None
        self._sampled = False
        self._ito_raw: set = set()  # layers reaching an Itô SDE's diffusion in this refresh (left raw)

    # ----------------------------------------------------------------------------- state & info
    def state_dict(self) -> dict:
        """Everything needed to resume: counters and, per layer (by module name), the (averaged)
        factors, bases, moments and the bias-correction step count."""
        return checkpoint.save(list(self._layers.values()), {"steps": self.steps, "refreshes": self.refreshes,
                                                             "moment": self.moment, "rule": self.rule})

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; tensors move to each layer's device and dtype.

        Raises ``ValueError`` naming the layers whose names or shapes do not match."""
        layers = list(self._layers.values())
        if isinstance(state, dict) and state.get("rule", DEFAULT_RULE) != self.rule:
            raise ValueError(f"SNOpt.load_state_dict: the state_dict was saved with rule={state['rule']!r}, "
                             f"this SNOpt has rule={self.rule!r}; build SNOpt with the same rule")
        checkpoint.check(layers, state)
        checkpoint.load(layers, state)
        self.steps, self.refreshes = int(state["steps"]), int(state["refreshes"])
        self._clear_stats()
        self._hooks.set_active(self.refreshing)

    def layers(self) -> Dict[str, dict]:
        """Per-layer diagnostics: role (``"ode"``: in an ODE/SDE field, time-sampled factors; ``"static"``;
        ``"foreign"``; ``"ito-diffusion"``: reaches an Itô SDE's diffusion, raw), factor shapes, samples."""
        return {st.name: {"role": st.role, "kind": type(st.module).__name__,
                          "A": tuple(st.u_a.shape) if st.u_a is not None else None,
                          "G": tuple(st.u_g.shape) if st.u_g is not None else None,
                          "samples": st.samples} for st in self._layers.values()}

    def factors(self) -> Dict[str, Tuple[Tensor, Tensor, float]]:
        """Per layer: the factors ``(A, G)`` of the last refresh (their running average with
        ``factor_ema``) and their multiplier (J samples, or k calls, times spatial locations), so
        that ``F ≈ mult · A ⊗ G``."""
        return {st.name: (st.a, st.g, st.mult)
                for st in self._layers.values() if st.a is not None}

    def diagnostics(self) -> dict:
        """Counters: steps, refreshes (basis rebuilds), samples per ODE layer at the last refresh, extra field
        evaluations spent on sampling (cumulative), the KL clip's last scale ``ν`` (a 0-dim tensor,
        left on its device so that logging every step costs no sync; ``None`` without a clip), and
        time spent in ``step()``."""
        return {"steps": self.steps, "refreshes": self.refreshes, "last_samples": self.last_samples,
                "kl_clip_scale": self.last_clip,
                "sampling_nfe": self.sampling_nfe, "step_time": self.step_time,
                "total_step_time": self.total_step_time, "layers": self.layers()}

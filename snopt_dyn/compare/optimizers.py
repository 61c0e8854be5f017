"""The optimizers ``snopt-dyn compare`` knows, by name, and how each is built for a model.

Besides SNOpt (preconditioning plain SGD, as in the paper) the baselines are what a practitioner
would pick today: Adam, SGD with momentum, AdamW with warm-up and cosine decay over the budget,
``torch.optim.Muon`` for the hidden 2-D weights (AdamW for the rest) and SOAP (a Shampoo-family
preconditioner from the optional ``pytorch-optimizer`` package: ``pip install 'snopt-dyn[baselines]'``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from snopt_dyn.schedules import SCHEDULES, warmup_cosine

#: Optimizers ``compare`` knows; ``snopt`` is SNOpt preconditioning plain SGD (as in the paper).
OPTIMIZER_NAMES = ("snopt", "adam", "sgd", "sgd-plain", "adamw-cosine", "muon", "soap")
#: Everything SNOpt is compared against (the verdict's "best baseline" is the best of these in a run).
BASELINES = tuple(n for n in OPTIMIZER_NAMES if n != "snopt")
#: Kept for code written against the first release (which had first-order baselines only).
FIRST_ORDER = BASELINES
OPTIMIZER_HELP = {
    "snopt": "SNOpt preconditioner on SGD without momentum, with the task's update rule (the paper's, or "
             "rule=adam: Adam in the time-sampled eigenbasis, the timeseries default), at a constant rate or with "
             "AdamW-cosine's warm-up and cosine decay where the task's defaults say schedule=cosine; variants: "
             "snopt[key=value;...]@LR with SNOpt's keyword arguments (rule=adam, power, beta1, beta2, eps, relative_eps, wd, "
             "factor_ema, eigh_every, burn_in, moment, damping, update_freq, ...) and schedule, momentum, rest, "
             "rest_lr",
    "adam": "torch.optim.Adam, constant learning rate",
    "sgd": "SGD with momentum 0.9",
    "sgd-plain": "SGD without momentum",
    "adamw-cosine": "AdamW (weight decay 1e-4), linear warm-up over 5% of the budget, then cosine decay to 0",
    "muon": "torch.optim.Muon on hidden 2-D weights, AdamW (lr/10) on the rest",
    "soap": "SOAP (pytorch-optimizer), Shampoo-family preconditioner",
}


def parse_optimizer(spec: str, task_snopt: Optional[Dict[str, object]] = None):
    """``"adam"`` → ``("adam", None)``; ``"adam@1e-3"`` → ``("adam", 0.001)``; raises ``ValueError``.

    SNOpt variants for ablations, ``"snopt[moment=paper;update_freq=20]@0.02"``, parse to their kind
    and learning rate here; :func:`snopt_overrides` reads the bracket, checked on top of
    ``task_snopt`` (the task's SNOpt defaults) as the run will use it (:func:`with_task_defaults`).
    """
    spec = spec.strip().lower()
    head, sep, lr = spec.rpartition("@") if "@" in spec.split("]")[-1] else (spec, "", "")
    kind = head.split("[", 1)[0]
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    split_snopt_options(with_task_defaults(snopt_overrides(spec), task_snopt))  # SNOpt's and the base's options
    if not sep:
        return kind, None
    try:
        value = float(lr)
    except ValueError:
        raise ValueError(f"bad learning rate in {spec!r}; write NAME@LR, e.g. adam@1e-3") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"learning rates must be positive, got {spec!r}")
    return kind, value


def with_task_defaults(overrides: Dict[str, object], task_snopt: Optional[Dict[str, object]]) -> Dict[str, object]:
    """The SNOpt options a run will get: ``overrides`` on top of the task's defaults.  Before the task
    is known (the command line's first check) an Adam-only option without ``rule`` is checked as under
    ``rule=adam``; the check with the task's rule follows once the task is known."""
    from ..preconditioner import ADAM_ONLY, layer_options

    if task_snopt is not None:
        return layer_options(task_snopt, overrides)
    if "rule" not in overrides and any(k in ADAM_ONLY for k in overrides):
        return {"rule": "adam", **overrides}
    return overrides


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text, text)


def snopt_overrides(spec: str) -> Dict[str, object]:
    """SNOpt keyword arguments in ``snopt[key=value;...]`` (empty for other specs); raises ``ValueError``."""
    if "[" not in spec:
        return {}
    kind, _, rest = spec.partition("[")
    body, close, _ = rest.partition("]")
    if kind.strip() != "snopt" or not close:
        raise ValueError(f"bad optimizer {spec!r}: only snopt takes [key=value;...] overrides, e.g. "
                         "snopt[moment=paper;update_freq=20]")
    out = {}
    for item in filter(None, (i.strip() for i in body.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad SNOpt override {item!r} in {spec!r}; write key=value")
        out[key.strip()] = _value(value.strip())
    return out


class Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for 2-D hidden weights, AdamW for the rest)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.defaults = {}
        self.state = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def muon_split(model: nn.Module):
    """``(hidden 2-D weights, the rest)``: Muon is for hidden layers' matrices; the first and the last
    2-D weight (input projection and read-out head), biases and conv kernels go to AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() == 2]
    hidden = {id(p) for p in matrices[1:-1]}
    return [p for p in params if id(p) in hidden], [p for p in params if id(p) not in hidden]


def _soap(params: List[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    try:
        from pytorch_optimizer import SOAP
    except ImportError:
        raise ImportError("the 'soap' baseline needs pytorch-optimizer: pip install 'snopt-dyn[baselines]'") from None
    return SOAP(params, lr=lr)


#: Every other key of ``snopt[...]`` is a keyword argument of :class:`snopt_dyn.SNOpt` (``wd`` is short
#: for ``weight_decay``), e.g. ``snopt[rule=adam;power=0.5;beta1=0.95;beta2=0.95;wd=0.01;factor_ema=0.9;
#: burn_in=1;eigh_every=5]@3e-3``: with ``rule=adam`` give the rate (``@LR``): the base SGD's rate is
#: then Adam's, not the task's SNOpt rate.
#: Keys of ``snopt[...]`` (and of a task's ``snopt`` defaults) that shape SNOpt's base optimizer in
#: ``compare`` rather than SNOpt itself: ``schedule`` (``constant`` or ``cosine``: AdamW-cosine's
#: warm-up and decay), ``momentum`` of the base SGD, ``rest`` (``sgd``, or ``adam`` for the layers
#: SNOpt does not precondition, at ``rest_lr``, default the task's Adam rate).
BASE_KEYS = ("schedule", "momentum", "rest", "rest_lr")
RESTS = ("sgd", "adam")


#: Short names ``snopt[...]`` accepts for SNOpt's keyword arguments.
ALIASES = {"wd": "weight_decay"}


def _canonical(options: Dict[str, object]) -> Dict[str, object]:
    """``options`` with :data:`ALIASES` spelled out; ``ValueError`` when both spellings are given."""
    out: Dict[str, object] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name in out:
            short = next(k for k, v in ALIASES.items() if v == name)
            raise ValueError(f"snopt[...] sets {name} twice ({short} is short for {name})")
        out[name] = value
    return out


def split_snopt_options(options: Dict[str, object]):
    """``(SNOpt's keyword arguments, the base optimizer's)``; ``ValueError`` on a bad option of
    either (SNOpt's are checked by :meth:`snopt_dyn.SNOpt.check_options`, before any run starts)."""
    from ..preconditioner import SNOpt
    options = _canonical(options)
    snopt = {k: v for k, v in options.items() if k not in BASE_KEYS}
    base = {k: v for k, v in options.items() if k in BASE_KEYS}
    if base.get("schedule", "constant") not in SCHEDULES:
        raise ValueError(f"snopt[schedule=...] must be one of {SCHEDULES}, got {base['schedule']!r}")
    if base.get("rest", "sgd") not in RESTS:
        raise ValueError(f"snopt[rest=...] must be one of {RESTS}, got {base['rest']!r}")
    for key in ("momentum", "rest_lr"):
        if key in base and not (isinstance(base[key], (int, float)) and not isinstance(base[key], bool)
                                and math.isfinite(base[key]) and base[key] >= 0):
            raise ValueError(f"snopt[{key}=...] must be a number >= 0, got {base[key]!r}")
    try:
        SNOpt.check_options(**snopt)
    except TypeError as err:
        raise ValueError(f"bad snopt[...] option: {err}; and the base optimizer's {', '.join(BASE_KEYS)}; "
                         f"short names: {', '.join(f'{k} ({v})' for k, v in ALIASES.items())}") from None
    except ValueError as err:
        raise ValueError(f"bad snopt[...] option: {err}") from None
    return snopt, base


def make_snopt_base(precond, lr: float, momentum: float = 0.0, rest: str = "sgd",
                    rest_lr: Optional[float] = None, schedule: str = "constant") -> torch.optim.Optimizer:
    """SNOpt's base optimizer: SGD over the preconditioned layers; the other parameters in the same
    SGD (``rest="sgd"``, the paper's setting) or in an Adam of their own at ``rest_lr``."""
    pre, others = precond.preconditioned_parameters(), precond.unpreconditioned_parameters()
    if rest == "sgd" or not others:
        return torch.optim.SGD(pre + others, lr=lr, momentum=float(momentum))
    return Combined([torch.optim.SGD(pre, lr=lr, momentum=float(momentum)),
                     torch.optim.Adam(others, lr=float(rest_lr if rest_lr is not None else lr))])


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The base optimizer of run ``name`` (for ``snopt``: the SGD that SNOpt preconditions)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name in ("sgd-plain", "snopt"):
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw-cosine":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    if name == "muon":
        hidden, rest = muon_split(model)
        parts = [torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")] if hidden else []
        return Combined(parts + [torch.optim.AdamW(rest, lr=lr / 10, weight_decay=1e-4)])
    if name == "soap":
        return _soap(params, lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")


def lr_multiplier(name: str, schedule: str = "constant") -> Optional[Callable[[float], float]]:
    """The learning-rate schedule of run ``name`` as a function of the fraction of the budget spent
    (training clock / budget, or iterations / iterations), or ``None`` for a constant rate.
    ``adamw-cosine``, and any run with ``schedule="cosine"``, warm up linearly and decay by a cosine."""
    if name != "adamw-cosine" and schedule != "cosine":
        return None
    return warmup_cosine


def set_lr(optimizer: torch.optim.Optimizer, base: Dict[int, float], multiplier: float) -> None:
    """Scale every parameter group's initial learning rate (``base``: id(group) -> lr)."""
    for group in optimizer.param_groups:
        group["lr"] = base[id(group)] * multiplier

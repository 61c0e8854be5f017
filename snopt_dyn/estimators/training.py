"""The shared training loop: optimizer (SNOpt on SGD by default), early stopping, time budget, progress.

SNOpt's settings are the main job's (``damping=0.05, sample_step=1.0``, then each model's own: the
Neural CDE's are the ``timeseries`` task's, the ODE-RNN's the ``latent`` task's), applied by plain
SGD at a constant rate unless ``schedule="cosine"``; ``snopt_options`` overrides them key by key.  As in the main job,
the parameters SNOpt does not precondition (:meth:`snopt_dyn.SNOpt.unpreconditioned_parameters`: a
GRU cell, norms) stay on the base SGD (``rest="sgd"``, the paper's setting) or get an Adam of their
own (``rest="adam"`` at ``rest_lr``), stepped with the SGD as one :class:`CombinedOptimizer`.

A warm start continues the optimizer, SNOpt and the batch order: :func:`save_state` after ``fit``,
:func:`resume` into the next ``fit``'s freshly built optimizer and SNOpt.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import snopt_dyn
from snopt_dyn.preconditioner import layer_options
from snopt_dyn.schedules import SCHEDULES, warmup_cosine

__all__ = ["OPTIMIZERS", "SNOPT_DEFAULTS", "RESTS", "SCHEDULES", "Budget", "History", "CombinedOptimizer", "make_optimizer",
           "save_state", "resume", "validation_split", "train"]

#: optimizer names the estimators accept
OPTIMIZERS = ("snopt", "adam", "sgd")
#: SNOpt's keyword arguments shared by every model (each model adds its own, see ``make_optimizer``)
SNOPT_DEFAULTS = dict(damping=0.05, sample_step=1.0)
#: what SNOpt's base optimizer does with the parameters SNOpt does not precondition (the main job's
#: ``rest``): ``"sgd"`` keeps them on the base SGD, ``"adam"`` gives them an Adam of their own
RESTS = ("sgd", "adam")
#: keys of ``snopt_options`` that shape the base optimizer, not SNOpt (as in the main job's ``snopt[...]``)
BASE_KEYS = ("rest", "rest_lr")

BatchLoss = Callable[[nn.Module, Tensor, Tensor], Tensor]


class CombinedOptimizer:
    """Torch optimizers over disjoint parameters, stepped as one (SNOpt's SGD and the Adam of the
    layers it does not precondition)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> List[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"state_dict holds {len(state['optimizers'])} optimizers, this one {len(self.optimizers)}")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def _check_rest(rest, rest_lr) -> None:
    if rest not in RESTS:
        raise ValueError(f"snopt_options['rest'] must be one of {RESTS}, got {rest!r}")
    if rest_lr is not None and (isinstance(rest_lr, bool) or not isinstance(rest_lr, (int, float))
                                or not (math.isfinite(rest_lr) and rest_lr > 0)):
        raise ValueError(f"snopt_options['rest_lr'] must be a positive number, got {rest_lr!r}")


def make_optimizer(name: str, model: nn.Module, lr: float, snopt_options: Optional[dict],
                   model_defaults: Optional[dict] = None, rest: str = "sgd", rest_lr: Optional[float] = None):
    """``(optimizer, SNOpt or None)``: SNOpt's update, applied by plain SGD;
    ``"sgd"`` is SGD with momentum 0.9.  SNOpt gets :data:`SNOPT_DEFAULTS`, then the model's own
    defaults (``model_defaults``), then ``snopt_options``.  ``rest``/``rest_lr`` (overridden by the
    same keys of ``snopt_options``): with ``"adam"`` the parameters SNOpt does not precondition get
    ``Adam(lr=rest_lr)`` (default ``lr``) and the optimizer is a :class:`CombinedOptimizer`; without
    such parameters it is the plain SGD either way."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr), None
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9), None
    if name == "snopt":
        options = layer_options(SNOPT_DEFAULTS, model_defaults, snopt_options)
        rest, rest_lr = options.pop("rest", rest), options.pop("rest_lr", rest_lr)
        _check_rest(rest, rest_lr)
        precond = snopt_dyn.SNOpt(model, **options)
        pre, others = precond.preconditioned_parameters(), precond.unpreconditioned_parameters()
        if rest == "sgd" or not others:
            return torch.optim.SGD(pre + others, lr=lr), precond
        return CombinedOptimizer([torch.optim.SGD(pre, lr=lr),
                                  torch.optim.Adam(others, lr=float(rest_lr if rest_lr is not None else lr))]), precond
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _layout(optimizer) -> list:
    """Which optimizers hold how many parameters per group: a saved state loads only into the same layout."""
    parts = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    return [(type(o).__name__, [len(g["params"]) for g in o.param_groups]) for o in parts]


def save_state(name: str, optimizer, precond, seed: int, generator: torch.Generator) -> dict:
    """What a warm start continues: the optimizer's and SNOpt's ``state_dict`` (copies), the seed and
    the batch-order generator's state."""
    return {"optimizer": name, "layout": _layout(optimizer), "base": copy.deepcopy(optimizer.state_dict()),
            "snopt": copy.deepcopy(precond.state_dict()) if precond is not None else None,
            "seed": int(seed), "generator": generator.get_state()}


def resume(state: Optional[dict], name: str, optimizer, precond, seed: int, generator: torch.Generator) -> bool:
    """Load a previous ``fit``'s :func:`save_state` into this ``fit``'s fresh optimizer and SNOpt.

    The optimizer state (e.g. Adam's moments) and SNOpt's (eigenbases, second moments, step and
    refresh counters) load when the optimizer has the same name and layout as before, else both start
    fresh; the hyperparameters (``lr``, ...) stay this ``fit``'s.  The generator continues when
    ``seed`` is the previous ``fit``'s.  Returns whether the optimizer state was loaded.
    """
    if state is None:
        return False
    if state["seed"] == seed:
        generator.set_state(state["generator"])
    if state["optimizer"] != name or state["layout"] != _layout(optimizer):
        return False
    if precond is not None:
        try:
            precond.load_state_dict(state["snopt"])  # checks names and shapes before it changes anything
        except ValueError:
            return False  # other layers preconditioned (e.g. snopt_options' skip changed): start fresh
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(copy.deepcopy(state["base"]))
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    return True


def validation_split(n: int, fraction: float, rng: np.random.RandomState,
                     labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` indices; stratified by ``labels`` when every class has 2+ members."""
    n_val = int(math.ceil(fraction * n))
    if n - n_val < 1 or n_val < 1:
        raise ValueError(f"validation_fraction={fraction} leaves no series to train or validate on "
                         f"(n_samples = {n}); pass more series or early_stopping=False")
    from sklearn.model_selection import StratifiedShuffleSplit, ShuffleSplit

    stratify = labels is not None
    if stratify:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        stratify = counts.min() >= 2 and n_val >= len(counts) and n - n_val >= len(counts)
        if not stratify:
            warnings.warn(f"validation split not stratified: a class has fewer than 2 series or the validation "
                          f"set ({n_val}) is smaller than the number of classes ({len(counts)}); pass more "
                          "series, a larger validation_fraction or early_stopping=False", UserWarning, stacklevel=4)
    splitter = (StratifiedShuffleSplit if stratify else ShuffleSplit)(1, test_size=n_val, random_state=rng)
    train, val = next(splitter.split(np.zeros((n, 1)), labels if stratify else None))
    return np.sort(train), np.sort(val)


@dataclass
class Budget:
    """When training stops: ``max_epochs``, ``max_time`` seconds, or ``n_iter_no_change`` epochs
    without the validation loss improving by more than ``tol``."""

    max_epochs: int
    max_time: Optional[float]
    n_iter_no_change: int
    tol: float

    def spent(self, steps: int, steps_per_epoch: int, seconds: float) -> float:
        """The fraction of the budget spent: of ``max_epochs`` or of ``max_time``, whichever runs out
        first (early stopping is not foreseen: it ends a fit wherever the schedule stands)."""
        fraction = steps / (self.max_epochs * steps_per_epoch)
        return max(fraction, seconds / self.max_time) if self.max_time is not None else fraction


class _Schedule:
    """Scales every parameter group's rate, as set when training starts, by ``warmup_cosine`` of the
    budget spent (``"cosine"``), or leaves it alone (``"constant"``)."""

    def __init__(self, name: str, optimizer, budget: Budget, steps_per_epoch: int):
        self.on, self.budget, self.steps_per_epoch = name == "cosine", budget, steps_per_epoch
        self.groups = [(g, g["lr"]) for g in optimizer.param_groups]

    def apply(self, steps: int, seconds: float) -> None:
        if self.on:
            multiplier = warmup_cosine(self.budget.spent(steps, self.steps_per_epoch, seconds))
            for group, lr in self.groups:
                group["lr"] = lr * multiplier


@dataclass
class History:
    loss_curve: List[float] = field(default_factory=list)
    validation_loss_curve: List[float] = field(default_factory=list)
    best_validation_loss: Optional[float] = None
    n_iter: int = 0
    n_steps: int = 0
    stopped_by: str = "max_epochs"
    train_time: float = 0.0


@torch.no_grad()
def mean_loss(model: nn.Module, batch_loss: BatchLoss, x: Tensor, y: Tensor, batch_size: int) -> float:
    """The loss over ``(x, y)`` in eval mode, batched (weighted by batch sizes)."""
    was_training = model.training
    model.eval()
    try:
        total = sum(float(batch_loss(model, x[i:i + batch_size], y[i:i + batch_size])) * len(y[i:i + batch_size])
                    for i in range(0, len(y), batch_size))
    finally:
        model.train(was_training)
    return total / len(y)


def _progress(verbose: int, total: int):
    """A tqdm bar over epochs, or ``None`` (``verbose=0``; or tqdm missing, with a warning)."""
    if not verbose:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("verbose progress needs tqdm: pip install tqdm (or pass verbose=0)", UserWarning, stacklevel=4)
        return None
    return tqdm(total=total, desc="fit", unit="epoch", leave=verbose > 1)


class _Stopper:
    """Tracks the best validation loss and keeps a copy of its weights."""

    def __init__(self, model: nn.Module, budget: Budget):
        self.model, self.budget = model, budget
        self.best, self.best_state, self.bad_epochs = math.inf, None, 0

    def update(self, loss: float) -> bool:
        """Record a validation loss; ``True`` when patience is exhausted."""
        if loss < self.best - self.budget.tol:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if loss < self.best:
            self.best, self.best_state = loss, copy.deepcopy(self.model.state_dict())
        return self.bad_epochs >= self.budget.n_iter_no_change

    def restore(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def _step(model, batch_loss, optimizer, precond, xb, yb) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(model, xb, yb)
    if not torch.isfinite(loss):
        raise RuntimeError(f"training diverged (loss {float(loss)}); lower lr or raise snopt_options['damping']")
    loss.backward()
    if precond is not None:
        precond.step()
    optimizer.step()
    return float(loss.detach())


def train(model: nn.Module, batch_loss: BatchLoss, data: Tuple[Tensor, Tensor],
          validation: Optional[Tuple[Tensor, Tensor]], optimizer, precond, batch_size: int, budget: Budget,
          generator: torch.Generator, verbose: int = 0, schedule: str = "constant") -> History:
    """Minibatch training until the budget ends, the rates following ``schedule`` over it; restores
    the weights of the best validation loss."""
    x, y = data
    history, stopper = History(), _Stopper(model, budget)
    rates = _Schedule(schedule, optimizer, budget, math.ceil(len(y) / batch_size))
    bar, start = _progress(verbose, budget.max_epochs), time.perf_counter()
    model.train()
    try:
        for _ in range(budget.max_epochs):
            order = torch.randperm(len(y), generator=generator).to(y.device)
            losses: Dict[str, float] = {"sum": 0.0, "n": 0}
            out_of_time = False
            for i in range(0, len(y), batch_size):
                idx = order[i:i + batch_size]
                rates.apply(history.n_steps, time.perf_counter() - start)
                losses["sum"] += _step(model, batch_loss, optimizer, precond, x[idx], y[idx]) * len(idx)
                losses["n"] += len(idx)
                history.n_steps += 1
                if budget.max_time is not None and time.perf_counter() - start > budget.max_time:
                    out_of_time = True
                    break
            history.n_iter += 1
            history.loss_curve.append(losses["sum"] / losses["n"])
            postfix = {"loss": f"{history.loss_curve[-1]:.4f}"}
            patience_out = False
            if validation is not None:
                history.validation_loss_curve.append(mean_loss(model, batch_loss, *validation, max(batch_size, 256)))
                patience_out = stopper.update(history.validation_loss_curve[-1])
                postfix["val_loss"] = f"{history.validation_loss_curve[-1]:.4f}"
            if bar is not None:
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            if out_of_time or patience_out:
                history.stopped_by = "max_time" if out_of_time else "early_stopping"
                break
    finally:
        if bar is not None:
            bar.close()
        if precond is not None:
            precond.remove()
    stopper.restore()
    history.best_validation_loss = stopper.best if validation is not None else None
    history.train_time = time.perf_counter() - start
    return history

"""Benchmark tasks of ``snopt-dyn compare``: real data, models written with the libraries' own APIs.

Every task builds its model the way a user of torchcde / torchdyn / torchdiffeq writes it and then
calls :func:`snopt_dyn.wrap` on it, so ``compare`` measures exactly what a user gets:

* ``timeseries`` -- the canonical torchcde Neural CDE (Kidger et al. 2020) on UEA JapaneseVowels:
  Hermite cubic spline with backward differences (coefficients computed once for the data set) of
  the standardised series plus a time channel; ``z0 = Linear(X(t0))``; ``torchcde.cdeint(...,
  adjoint=True, method="dopri5", rtol=atol=1e-3)``; ``Linear`` read-out of ``z(T)``.
* ``image`` -- a torchdyn conv Neural ODE on a 4,000/1,000 MNIST subset: a stride-2 conv stem
  (1→8 channels, 28×28→14×14), ``torchdyn.core.NeuralODE`` with a conv field (8→16→8, softplus and
  tanh), dopri5 rtol=atol=1e-3 on ``t_span=[0, 1]``, 4×4 average pooling and a ``Linear`` head.
* ``latent`` -- an ODE-RNN classifier (:class:`snopt_dyn.models.ODERNN`, plain
  ``torchdiffeq.odeint_adjoint`` calls) on JapaneseVowels with 50 % of the observations dropped
  (the irregular-sampling protocol of Kidger et al. 2020).

A task knows its data, its model, its loss, its test metric and the *defaults* of the comparison:
batch size, budget and each optimizer's tuned learning rate (``TUNING`` records how they were
chosen).  torchcde and torchdyn are imported only by the task that needs them.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import snopt_dyn
from snopt_dyn import datasets

__all__ = ["TaskError", "Task", "TASKS", "TUNING", "get_task", "load_series", "OPTIMIZER_NAMES", "FIRST_ORDER"]

#: Optimizers ``compare`` knows; ``snopt`` is SNOpt preconditioning plain SGD (as in the paper).
OPTIMIZER_NAMES = ("snopt", "adam", "sgd", "sgd-plain")
#: The first-order baselines (used for the default target accuracy).
FIRST_ORDER = ("adam", "sgd", "sgd-plain")
OPTIMIZER_HELP = {
    "snopt": "SNOpt preconditioner on SGD without momentum (the paper's setting)",
    "adam": "torch.optim.Adam",
    "sgd": "SGD with momentum 0.9",
    "sgd-plain": "SGD without momentum",
}

# Imported on first use by the task that needs them; module globals so that the model code below
# refers to ``torchcde.cdeint`` exactly as user code does (``snopt_dyn.wrap`` finds it there).
torchcde = None


class TaskError(RuntimeError):
    """A task cannot run here (a missing optional dependency, an unusable device)."""


def _import_torchcde():
    global torchcde
    if torchcde is None:
        try:
            import torchcde as module
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TaskError("task 'timeseries' needs torchcde: pip install 'snopt-dyn[torchcde]'") from exc
        torchcde = module
    return torchcde


def _import_torchdyn():
    try:
        from torchdyn.core import NeuralODE
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TaskError("task 'image' needs torchdyn: pip install 'snopt-dyn[torchdyn]'") from exc
    return NeuralODE


# ----------------------------------------------------------------------------------------- models
class CDEFunc(nn.Module):
    """The CDE's vector field ``f(z)``: an MLP ending in a Linear reshaped to (hidden, channels), tanh."""

    def __init__(self, input_channels: int, hidden: int, width: int = 64):
        super().__init__()
        self.input_channels, self.hidden = input_channels, hidden
        self.linear1 = nn.Linear(hidden, width)
        self.linear2 = nn.Linear(width, hidden * input_channels)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        z = F.relu(self.linear1(z))
        z = torch.tanh(self.linear2(z))
        return z.view(*z.shape[:-1], self.hidden, self.input_channels)


class NeuralCDE(nn.Module):
    """``z0 = Linear(X(t0))``, ``dz = f(z) dX``, logits ``= Linear(z(T))`` -- torchcde's canonical model."""

    def __init__(self, input_channels: int, hidden: int, num_classes: int, width: int = 64,
                 rtol: float = 1e-3, atol: float = 1e-3):
        super().__init__()
        self.initial = nn.Linear(input_channels, hidden)
        self.func = CDEFunc(input_channels, hidden, width)
        self.readout = nn.Linear(hidden, num_classes)
        self.rtol, self.atol = rtol, atol

    def forward(self, coeffs: Tensor) -> Tensor:
        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        z = torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=True,
                            method="dopri5", rtol=self.rtol, atol=self.atol)
        return self.readout(z[:, -1])


class ConvField(nn.Module):
    """Conv vector field of the image task: 8→16→8 channels, softplus then tanh."""

    def __init__(self, channels: int = 8, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor, args=None) -> Tensor:  # torchdyn calls vf(t, x, args=...)
        return torch.tanh(self.conv2(F.softplus(self.conv1(x))))


def build_image_model(channels: int = 8, width: int = 16, pool: int = 4, num_classes: int = 10,
                      rtol: float = 1e-3, atol: float = 1e-3) -> nn.Module:
    """Conv stem → torchdyn ``NeuralODE`` (dopri5, adjoint) → pooling → Linear (unwrapped)."""
    NeuralODE = _import_torchdyn()
    node = NeuralODE(ConvField(channels, width), solver="dopri5", sensitivity="adjoint",
                     rtol=rtol, atol=atol, solver_adjoint="dopri5", rtol_adjoint=rtol, atol_adjoint=atol,
                     return_t_eval=False)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.Softplus(),
        _LastState(node),
        nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
        nn.Linear(channels * pool * pool, num_classes),
    )


class _LastState(nn.Module):
    """Runs a NeuralODE on ``t_span = [0, 1]`` and keeps the final state."""

    def __init__(self, node: nn.Module):
        super().__init__()
        self.node = node
        self.register_buffer("t_span", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.node(x, self.t_span)[-1]


# ----------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One benchmark: data, model, loss, metric and the comparison's defaults.

    ``lrs`` are the tuned default learning rates (for ``snopt`` the base SGD's), ``snopt`` the
    preconditioner's keyword arguments, ``budget`` the default training-clock seconds per optimizer.
    """

    name: str
    description: str
    batch_size: int
    budget: float
    lrs: Dict[str, float]
    snopt: Dict[str, float]
    metric: str = "accuracy"
    higher_is_better: bool = True
    eval_batch: int = 512
    eval_points: int = 25
    # filled by prepare()
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    train_x: Optional[Tensor] = field(default=None, repr=False)
    train_y: Optional[Tensor] = field(default=None, repr=False)
    test_x: Optional[Tensor] = field(default=None, repr=False)
    test_y: Optional[Tensor] = field(default=None, repr=False)
    info: Dict[str, object] = field(default_factory=dict)
    loader: Callable = field(default=None, repr=False)
    builder: Callable = field(default=None, repr=False)
    data: str = ""

    def prepare(self, device: torch.device, max_train: Optional[int] = None,
                max_test: Optional[int] = None) -> "Task":
        """Load the data onto ``device``; ``max_train``/``max_test`` keep that many examples, evenly
        spaced through each split (the splits are sorted by class, so the first N would be one class)."""
        self.device = torch.device(device)
        (xtr, ytr), (xte, yte), info = self.loader()
        if max_train is not None:
            xtr, ytr = _spread(xtr, max_train), _spread(ytr, max_train)
        if max_test is not None:
            xte, yte = _spread(xte, max_test), _spread(yte, max_test)
        self.train_x, self.train_y = xtr.to(self.device), ytr.to(self.device)
        self.test_x, self.test_y = xte.to(self.device), yte.to(self.device)
        self.info = dict(info, n_train=len(ytr), n_test=len(yte))
        return self

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    def make_model(self, seed: int) -> nn.Module:
        """The task's model, initialised from ``seed``, wrapped by :func:`snopt_dyn.wrap`, on the device."""
        torch.manual_seed(seed)
        model = self.builder(self.info)
        model = snopt_dyn.wrap(model)
        return model.to(self.device)

    def loss(self, model: nn.Module, index: Tensor) -> Tensor:
        """Mean cross-entropy of the training examples ``index``."""
        return F.cross_entropy(model(self.train_x[index]), self.train_y[index])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Test accuracy (fraction in [0, 1]), in eval mode, batched."""
        was_training = model.training
        model.eval()
        correct = 0
        try:
            for start in range(0, len(self.test_y), self.eval_batch):
                x = self.test_x[start:start + self.eval_batch]
                y = self.test_y[start:start + self.eval_batch]
                correct += int((model(x).argmax(-1) == y).sum())
        finally:
            model.train(was_training)
        return correct / len(self.test_y)


def _spread(x: Tensor, count: int) -> Tensor:
    if count >= len(x):
        return x
    return x[torch.linspace(0, len(x) - 1, count).round().long()]


def _pad_to(x: Tensor, length: int) -> Tensor:
    """Pad (N, L, C) to ``length`` steps by repeating the last step (the series stays flat)."""
    if x.shape[1] >= length:
        return x
    return torch.cat([x, x[:, -1:].expand(-1, length - x.shape[1], -1)], dim=1)


def _series_files(data: str):
    """``None`` for a vendored set, else the two ``.ts`` paths; raises ``ValueError`` on bad input."""
    if data in ("", "japanese_vowels", "JapaneseVowels", "basic_motions", "BasicMotions"):
        return None
    paths = [p.strip() for p in data.split(",")]
    if len(paths) != 2 or not all(paths):
        raise ValueError(f"--data must be japanese_vowels, basic_motions or TRAIN.ts,TEST.ts; got {data!r}")
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--data: no such file {path!r}")
    return paths


def load_series(data: str = "japanese_vowels"):
    """Standardised (train, test) :class:`~snopt_dyn.datasets.TimeSeriesData` for ``data``.

    ``data`` is ``"japanese_vowels"`` (default), ``"basic_motions"`` (both vendored) or
    ``"TRAIN.ts,TEST.ts"``: any pair of UEA ``.ts`` classification files (e.g. the paper's
    CharacterTrajectories or ArticularyWordRecognition from timeseriesclassification.com); the test
    split is standardised with the train split's statistics and uses the train split's classes.
    """
    if data in ("", "japanese_vowels", "JapaneseVowels"):
        return (datasets.load_japanese_vowels("train", standardize=True),
                datasets.load_japanese_vowels("test", standardize=True))
    if data in ("basic_motions", "BasicMotions"):
        return (datasets.load_basic_motions("train", standardize=True),
                datasets.load_basic_motions("test", standardize=True))
    paths = _series_files(data)
    train = datasets.load_uea_ts(paths[0])
    test = datasets.load_uea_ts(paths[1], classes=train.classes)
    mean, std = datasets.channel_statistics(train)
    return datasets.standardize(train, mean, std), datasets.standardize(test, mean, std)


def _load_series_cde(data: str):
    cde = _import_torchcde()
    train, test = load_series(data)
    length = max(train.values.shape[1], test.values.shape[1])  # 29: train and test share [0, 28]
    scale = float(length - 1)
    xtr = _pad_to(datasets.with_time_channel(train, time_scale=scale), length)
    xte = _pad_to(datasets.with_time_channel(test, time_scale=scale), length)
    ctr = cde.hermite_cubic_coefficients_with_backward_differences(xtr)
    cte = cde.hermite_cubic_coefficients_with_backward_differences(xte)
    info = dict(channels=xtr.shape[-1], num_classes=train.num_classes, length=length)
    return (ctr, train.labels), (cte, test.labels), info


def _build_cde(info) -> nn.Module:
    _import_torchcde()
    return NeuralCDE(info["channels"], 32, info["num_classes"])


def _load_mnist():
    _import_torchdyn()
    return datasets.load_mnist_subset("train"), datasets.load_mnist_subset("test"), dict(num_classes=10)


def _load_digits():
    _import_torchdyn()
    return datasets.load_digits("train"), datasets.load_digits("test"), dict(num_classes=10)


def _build_image(info) -> nn.Module:
    return build_image_model(num_classes=info["num_classes"])


class _ODERNNTask(Task):
    """Inputs are packed as one tensor (N, L, C + 2): values (NaN → 0), mask, observation time."""

    def loss(self, model, index):
        return F.cross_entropy(_odernn_forward(model, self.train_x[index]), self.train_y[index])

    @torch.no_grad()
    def evaluate(self, model):
        was_training = model.training
        model.eval()
        correct = 0
        try:
            for start in range(0, len(self.test_y), self.eval_batch):
                logits = _odernn_forward(model, self.test_x[start:start + self.eval_batch])
                correct += int((logits.argmax(-1) == self.test_y[start:start + self.eval_batch]).sum())
        finally:
            model.train(was_training)
        return correct / len(self.test_y)


def _odernn_forward(model: nn.Module, packed: Tensor) -> Tensor:
    values, mask, times = packed[..., :-2], packed[..., -2] > 0.5, packed[..., -1]
    return model(values, times, mask)


def _load_series_irregular(data: str):
    train, test = load_series(data)
    train = datasets.drop_observations(train, 0.5, seed=0)
    test = datasets.drop_observations(test, 0.5, seed=1)

    def pack(d):
        # times repeat the last time after a series ends: zero gaps, so the state stops evolving there
        return torch.cat([torch.nan_to_num(d.values), d.mask.unsqueeze(-1).to(d.values.dtype),
                          d.times.unsqueeze(-1).to(d.values.dtype)], -1)

    info = dict(channels=train.values.shape[-1], num_classes=train.num_classes, dropped=0.5)
    return (pack(train), train.labels), (pack(test), test.labels), info


def _build_odernn(info) -> nn.Module:
    from snopt_dyn.models import ODERNN
    return ODERNN(info["channels"], hidden=32, num_classes=info["num_classes"], width=32,
                  method="dopri5", rtol=1e-3, atol=1e-3)


#: How the defaults below were chosen.  Same protocol for every method: one interleaved
#: ``snopt-dyn compare`` process per sweep (all learning rates of all methods take turns, so the
#: machine's speed drift hits them alike), 40 s of training clock per run, learning rates on a ~3x
#: grid extended until the best was inside it.  Criterion: the mean test accuracy over the last
#: third of the budget (single evaluations jump by up to ±10 points between neighbours, so the final
#: value alone is a lottery).  The host was heavily shared while tuning (load 3-8 on 2 cores), so
#: runs made only 20-65 iterations.
TUNING = {
    "timeseries": (
        "batch 32, seeds 0 and 1 (mean accuracy over the last third, seed 0 / seed 1). "
        "snopt (base SGD lr): 0.01 89.7/89.8, 0.02 -/90.4, 0.03 84.0/-, 0.1 79.2/- -> 0.02. "
        "adam: 1e-3 91.2/-, 3e-3 92.1/92.1, 1e-2 92.7/83.6 -> 3e-3. "
        "sgd (momentum 0.9): 0.01 86.5/87.8, 0.03 83.2/84.4, 0.1 69.9/- -> 0.01. "
        "sgd-plain: 0.03 92.7/-, 0.1 93.6/88.3, 0.3 87.9/- -> 0.1. "
        "Batch 128 (one sweep, seed 0, same grid) was no better per second for any method: kept 32. "
        "SNOpt damping 0.05, refresh every 50, sample step 1.0 (28 samples) are the prototype's."),
    "image": (
        "batch 64, seed 0, 500 test images, two sweeps. "
        "snopt: 0.01 16.3, 0.03 59.5, 0.1 81.4/67.9, 0.3 40.3, 1 22.0 -> 0.1. "
        "adam: 1e-3 13.2, 3e-3 35.1, 1e-2 57.6/48.0, 3e-2 49.5 -> 1e-2. "
        "sgd (momentum 0.9): 0.01 18.2, 0.03 27.9, 0.1 59.5/53.2, 0.3 59.8, 1 diverged -> 0.3. "
        "sgd-plain: 0.3 26.8, 1 50.8 -> 1. "
        "SNOpt sample step 0.25 (4 samples), not 0.1: with the torchdyn backend the backward solve "
        "lands on every sample time, so a refresh iteration cost 5.5x a plain one at 0.1, 2.7x at 0.25."),
    "latent": (
        "batch 32, seed 0, two sweeps. "
        "snopt: 0.01 72.8, 0.03 73.5/73.4, 0.1 64.3 -> 0.03. "
        "adam: 1e-3 27.0, 3e-3 55.4, 1e-2 71.9/63.4, 3e-2 53.9 -> 1e-2. "
        "sgd (momentum 0.9): 1e-3 18.5, 3e-3, 0.01, 0.03 and 0.1 diverged (the hidden state "
        "explodes, the solver stops) -> 1e-3. "
        "sgd-plain: 0.01 16.5, 0.03 36.3, 0.1 diverged -> 0.03. "
        "SNOpt: one sample per gap solve (sample step 1.0 on each [0, 1] solve); the GRUCell is "
        "left to the base SGD (not a Linear/Conv layer)."),
}


# Defaults. See TUNING for what was tried; every method got the same grid on the same budget.
def _timeseries(data: str) -> Task:
    _series_files(data)
    return Task(
        name="timeseries",
        description="torchcde Neural CDE (hidden 32, Hermite cubic spline, dopri5 1e-3)",
        batch_size=32, budget=50.0,
        lrs={"snopt": 0.02, "adam": 3e-3, "sgd": 0.01, "sgd-plain": 0.1},
        snopt=dict(damping=0.05, update_freq=50, sample_step=1.0),
        loader=functools.partial(_load_series_cde, data), builder=_build_cde, data=data or "japanese_vowels")


def _image(data: str) -> Task:
    if data not in ("", "mnist", "mnist_subset", "digits"):
        raise ValueError(f"task 'image' runs on the vendored MNIST subset (--data mnist) or sklearn digits "
                         f"(--data digits); got {data!r}. For other images build a Task in Python (see snopt_dyn.tasks)")
    if data == "digits":  # 8x8 digits: easy, for quick checks (too easy to separate optimizers)
        return Task(
            name="image", description="torchdyn conv Neural ODE (8-16-8 conv field, dopri5 1e-3) on sklearn digits",
            batch_size=64, budget=30.0,
            lrs={"snopt": 0.1, "adam": 1e-2, "sgd": 0.3, "sgd-plain": 1.0},
            snopt=dict(damping=0.05, update_freq=50, sample_step=0.1),
            eval_batch=450, eval_points=15, loader=_load_digits, builder=_build_image, data="digits")
    return Task(
        name="image",
        description="torchdyn conv Neural ODE (8-16-8 conv field, dopri5 1e-3)",
        batch_size=64, budget=45.0,
        lrs={"snopt": 0.1, "adam": 1e-2, "sgd": 0.3, "sgd-plain": 1.0},
        snopt=dict(damping=0.05, update_freq=50, sample_step=0.25),
        eval_batch=250, eval_points=15,
        loader=_load_mnist, builder=_build_image, data="mnist_subset")


def _latent(data: str) -> Task:
    _series_files(data)
    return _ODERNNTask(
        name="latent",
        description="ODE-RNN classifier (snopt_dyn.models.ODERNN), 50% of observations dropped",
        batch_size=32, budget=50.0,
        lrs={"snopt": 0.03, "adam": 1e-2, "sgd": 1e-3, "sgd-plain": 0.03},
        snopt=dict(damping=0.05, update_freq=50, sample_step=1.0),
        loader=functools.partial(_load_series_irregular, data), builder=_build_odernn,
        data=data or "japanese_vowels")


def _flow(data: str) -> Task:
    if data:
        raise ValueError("--task flow runs on the vendored diamonds table only; --data is not supported")
    from .flow import build_flow_task  # flow.py builds on this module
    return build_flow_task()


TASKS: Dict[str, Callable[[str], Task]] = {"timeseries": _timeseries, "image": _image, "latent": _latent,
                                           "flow": _flow}


def get_task(name: str, data: str = "") -> Task:
    """A fresh, unprepared task by name; ``data`` picks the data set where the task allows it."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](data or "")

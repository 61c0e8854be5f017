"""What a benchmark task of ``snopt-dyn compare`` is: data, model, loss, metric and defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import snopt_dyn

#: SNOpt's settings on the series tasks (timeseries, latent): Adam in the time-sampled eigenbasis,
#: refreshed every 20 iterations, after 10 iterations of Adam in the weights' own basis with the
#: moments restarted at the first basis (BENCHMARKS.md §6, tenth round)
SERIES_SNOPT = dict(rule="adam", power=0.5, update_freq=20, sample_step=1.0, first_basis=10, first_moments="restart")


class TaskError(RuntimeError):
    """A task cannot run here (a missing optional dependency, an unusable device)."""


# ----------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One benchmark: data, model, loss, metric and the comparison's defaults.

    ``lrs`` are the tuned default learning rates (for ``snopt`` the base SGD's), ``snopt`` the
    preconditioner's keyword arguments, ``budget`` the default training-clock seconds per optimizer.
    Test evaluations (no gradient, eval mode) solve with per-sample error control at ``eval_tol``.
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
    #: rtol/atol of test evaluations, which run with per-sample error control (``wrap(eval_tol=)``),
    #: so an example's prediction does not depend on the evaluation batch (``None``: the model's own)
    eval_tol: Optional[float] = None
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
            xtr, ytr = spread(xtr, max_train), spread(ytr, max_train)
        if max_test is not None:
            xte, yte = spread(xte, max_test), spread(yte, max_test)
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
        model = snopt_dyn.wrap(model, per_sample_error="eval", eval_tol=self.eval_tol)
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


def spread(x: Tensor, count: int) -> Tensor:
    if count >= len(x):
        return x
    return x[torch.linspace(0, len(x) - 1, count).round().long()]

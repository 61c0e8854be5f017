"""The shared estimator: parameters, ``fit`` orchestration, batched prediction, device, warm start.

Subclasses say how series become model inputs (:meth:`_SeriesEstimator._encode`), which model to
build (:meth:`_build`) and how a batch's outputs are computed (:meth:`_forward`); the target side
(classification or regression) comes from :mod:`snopt_dyn.estimators.heads`.

Persistence: a fitted estimator pickles (``pickle``, ``joblib``, ``torch.save``; with ``torch.load``
pass ``weights_only=False``, as for any pickled object) and predicts identically after loading; the
model is the same wrapped module (``snopt_dyn.wrap`` models pickle).  SNOpt itself is not kept: it
is bound to its model, built by every ``fit`` and removed at its end (the fitted model carries no hook).

Warm start (``warm_start=True``): ``fit`` also keeps, in the private ``_warm_state`` (pickled with the
estimator), the optimizer's ``state_dict`` (Adam's moments, where there is an Adam), SNOpt's
``state_dict`` (eigenbases, second moments, step and refresh counters) and the batch-order generator;
the next ``fit`` loads them into the optimizer and SNOpt it builds and continues.  With
``early_stopping=False`` and an int ``random_state``, ``fit`` for k epochs and then k more equals one
``fit`` of 2k epochs (``tests/test_estimators_parity.py``: the weights agree bitwise on CPU, asserted
to 1e-6).  What may change between the fits:

* ``random_state``: the batch order continues only when ``random_state`` gives the previous ``fit``'s
  seed (the same int); otherwise it is drawn afresh from the new ``random_state`` (so with ``None``
  every ``fit`` shuffles anew).  The optimizer and SNOpt state are kept either way.
* the data: any series with the fitted channels (and, for classifiers, known labels); the
  preprocessing (and a regressor's target scaling) of the first ``fit`` stays, the kept state simply
  continues on the new batches.
* ``optimizer`` (or what SNOpt preconditions, ``snopt_options``' ``skip``/``rest``): the state loads
  only into an optimizer of the same name and layout, else the new one starts fresh (weights kept);
  hyperparameters such as ``lr`` or ``damping`` are always the current ``fit``'s.

With early stopping the weights are those of the best validation epoch while the kept state is the
last step's, and each ``fit`` draws its own validation split: k + k then differs from 2k.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

import snopt_dyn
from . import inputs, preprocessing, training

__all__ = ["SeriesEstimator"]

_PREDICT_BATCH = 256


def _device(device) -> torch.device:
    """``device`` as a ``torch.device``; a clear ``ValueError`` when it is unknown or unavailable."""
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; pass device='cpu'")
    return dev


def _canonical_order(x: Tensor) -> Tensor:
    """A permutation set by the series' contents, not by their order in ``X``.

    The series of a batch share the adaptive solver's steps (and its error norm's sum), so a series'
    output depends on its batch mates; predicting in this order makes the outputs independent of the
    order of ``X`` (exactly, not just to rounding).
    """
    rows = x.detach().cpu().reshape(len(x), -1).numpy()
    return torch.as_tensor(np.lexsort(rows.T[::-1]), dtype=torch.long)


class SeriesEstimator(BaseEstimator):
    """Parameters and ``fit`` loop common to the Neural CDE and ODE-RNN estimators (see their docs)."""

    #: learning rate per optimizer when ``lr=None`` (subclasses: the main job's tuned values)
    _default_lrs: dict = {}
    #: SNOpt keyword arguments of this model, between the shared defaults and ``snopt_options``
    _snopt_defaults: dict = {}
    #: SNOpt's base optimizer for the parameters SNOpt does not precondition: ``"sgd"`` (the base SGD,
    #: the paper's setting) or ``"adam"`` (an Adam of their own at ``_default_lrs["adam"]``, as in the
    #: main job's ``rest=adam``); ``snopt_options={"rest": ..., "rest_lr": ...}`` overrides it
    _snopt_rest: str = "sgd"

    def __init__(self, *, hidden: int = 32, width: Optional[int] = None, optimizer: str = "snopt", lr: Optional[float] = None,
                 snopt_options: Optional[dict] = None, schedule: str = "constant", batch_size: int = 32,
                 max_epochs: int = 100,
                 max_time: Optional[float] = None, early_stopping: bool = True, validation_fraction: float = 0.1,
                 n_iter_no_change: int = 10, tol: float = 1e-4, rtol: float = 1e-3, atol: float = 1e-3,
                 predict_tol: Optional[float] = 1e-5,
                 warm_start: bool = False, random_state=None, device="cpu", verbose: int = 1):
        self.hidden, self.width = hidden, width
        self.optimizer, self.lr, self.snopt_options, self.schedule = optimizer, lr, snopt_options, schedule
        self.batch_size, self.max_epochs, self.max_time = batch_size, max_epochs, max_time
        self.early_stopping, self.validation_fraction = early_stopping, validation_fraction
        self.n_iter_no_change, self.tol = n_iter_no_change, tol
        self.rtol, self.atol, self.predict_tol = rtol, atol, predict_tol
        self.warm_start, self.random_state, self.device, self.verbose = warm_start, random_state, device, verbose

    # ------------------------------------------------------------------------- subclass hooks
    def _encode(self, data, scaling: preprocessing.Scaling) -> Tensor:
        raise NotImplementedError

    def _build(self, channels: int, outputs: int) -> nn.Module:
        raise NotImplementedError

    def _forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    # ------------------------------------------------------------------------- validation
    def _check_params(self) -> None:
        if self.optimizer not in training.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {training.OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in training.SCHEDULES:
            raise ValueError(f"schedule must be one of {training.SCHEDULES}, got {self.schedule!r}")
        for name in ("hidden", "width", "batch_size", "max_epochs", "n_iter_no_change"):
            value = getattr(self, name)
            if name == "width" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "max_time", "predict_tol"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if self.early_stopping and not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction!r}")
        if self.snopt_options is not None and not isinstance(self.snopt_options, dict):
            raise ValueError(f"snopt_options must be a dict of snopt_dyn.SNOpt keyword arguments, "
                             f"got {type(self.snopt_options).__name__}")

    def _read(self, X, times, fitted: bool):
        """``X`` as TimeSeriesData (parameters checked first in ``fit``); at predict time its channels
        must match ``fit``'s."""
        if not fitted:
            self._check_params()
        data = inputs.read_series(X, times)
        if fitted and data.num_channels != self.n_features_in_:
            raise ValueError(f"X has {data.num_channels} channels, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} channels as input (as in fit)")
        return data

    # ------------------------------------------------------------------------- fit
    def _fit(self, data, y: Tensor, stratify: Optional[np.ndarray], outputs: int, batch_loss,
             start: float) -> "SeriesEstimator":
        """Preprocess ``data`` (from :meth:`_read`), build (or keep, with ``warm_start``) the model, train;
        sets the fitted attributes.  ``start``: the ``perf_counter`` time ``fit`` began."""
        if len(y) != len(data):
            raise ValueError(f"X holds {len(data)} series but y has {len(y)} targets (len(X) != len(y))")
        device = _device(self.device)
        warm = self.warm_start and hasattr(self, "model_")
        if warm and data.num_channels != self.n_features_in_:
            raise ValueError(f"warm_start: X has {data.num_channels} channels, the fitted model {self.n_features_in_}")
        scaling = self.scaling_ if warm else preprocessing.fit_scaling(data)
        x = self._encode(data, scaling).to(device)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = self.model_.to(device) if warm else self._wrap(self._build(data.num_channels, outputs)).to(device)
            history, state = self._train(model, batch_loss, x, y.to(device), stratify, seed,
                                         getattr(self, "_warm_state", None) if warm else None)
        self.model_, self.scaling_, self.n_features_in_, self.device_ = model.eval(), scaling, data.num_channels, device
        self.history_ = history
        if self.warm_start:
            self._warm_state = state
        else:
            self.__dict__.pop("_warm_state", None)
        self.n_iter_ = (getattr(self, "n_iter_", 0) if warm else 0) + history.n_iter
        self.n_steps_ = (getattr(self, "n_steps_", 0) if warm else 0) + history.n_steps
        self.loss_curve_, self.validation_loss_curve_ = history.loss_curve, history.validation_loss_curve
        self.best_validation_loss_, self.stopped_by_ = history.best_validation_loss, history.stopped_by
        self.fit_time_ = time.perf_counter() - start
        return self

    def _train(self, model, batch_loss, x, y, stratify, seed, state: Optional[dict]):
        """``(History, the state a warm start continues)``; ``state``: the previous ``fit``'s, or None."""
        rng = np.random.RandomState(seed)
        if self.early_stopping:
            train_idx, val_idx = training.validation_split(len(y), self.validation_fraction, rng, stratify)
            train_idx, val_idx = torch.as_tensor(train_idx, device=y.device), torch.as_tensor(val_idx, device=y.device)
            data, validation = (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
        else:
            data, validation = (x, y), None
        lr = self.lr if self.lr is not None else self._default_lrs[self.optimizer]
        optimizer, precond = training.make_optimizer(self.optimizer, model, lr, self.snopt_options,
                                                      self._snopt_defaults, self._snopt_rest,
                                                      self._default_lrs["adam"])
        budget = training.Budget(self.max_epochs, self.max_time, self.n_iter_no_change, self.tol)
        generator = torch.Generator().manual_seed(seed)
        try:
            training.resume(state, self.optimizer, optimizer, precond, seed, generator)
        except BaseException:
            if precond is not None:
                precond.remove()  # train() removes it otherwise; the model must not keep its hooks
            raise
        history = training.train(model, batch_loss, data, validation, optimizer, precond, self.batch_size, budget,
                                 generator, verbose=int(self.verbose), schedule=self.schedule)
        keep = training.save_state(self.optimizer, optimizer, precond, seed, generator) if self.warm_start else None
        return history, keep

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The engine for every solve; predictions (no gradient, eval mode) with per-sample error
        control at ``predict_tol``, so a series' prediction does not depend on its batch mates."""
        self._check_params()
        return snopt_dyn.wrap(model, per_sample_error="eval", eval_tol=self.predict_tol)

    # ------------------------------------------------------------------------- predict
    @torch.no_grad()
    def _outputs(self, X, times=None) -> Tensor:
        """The model's outputs for ``X`` (CPU, float32), in eval mode and batches of 256 series."""
        check_is_fitted(self, "model_")
        data = self._read(X, times, fitted=True)
        x = self._encode(data, self.scaling_)
        order = _canonical_order(x)
        x = x[order].to(self.device_)
        self.model_.eval()
        if getattr(self.model_, "_snopt_wrap", None) is not None and self.model_._snopt_wrap.eval_tol != self.predict_tol:
            self._wrap(self.model_)  # predict_tol changed by set_params after fit
        out = [self._forward(self.model_, x[i:i + _PREDICT_BATCH]).cpu() for i in range(0, len(x), _PREDICT_BATCH)]
        return torch.cat(out)[torch.argsort(order)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # NaN = missing observation
        tags.input_tags.three_d_array = True
        return tags

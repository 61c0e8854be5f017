"""The target side of the estimators: classifiers (cross-entropy, ``classes_``, ``predict_proba``) and
regressors (mean squared error on standardised targets)."""
from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils.validation import check_is_fitted
from torch.nn import functional as F

from . import targets
from .base import SeriesEstimator

__all__ = ["SeriesClassifier", "SeriesRegressor"]


class SeriesClassifier(ClassifierMixin, SeriesEstimator):
    """A series classifier: ``fit(X, y)``, ``predict``, ``predict_proba``, ``score`` (accuracy), ``classes_``."""

    def fit(self, X, y, times=None) -> "SeriesClassifier":
        """Train on series ``X`` with labels ``y`` (any hashable labels; at least 2 classes).

        ``times``: optional observation times (see :mod:`snopt_dyn.estimators.inputs`).  With
        ``warm_start=True`` a fitted classifier continues from its weights; ``y`` may then only
        hold the labels it already knows.
        """
        start = time.perf_counter()
        data = self._read(X, times, fitted=False)
        warm = self.warm_start and hasattr(self, "classes_")
        classes, index = targets.class_targets(y, type(self).__name__, self.classes_ if warm else None)

        def batch_loss(model, xb, yb):
            return F.cross_entropy(self._forward(model, xb), yb)

        self._fit(data, index, stratify=index.numpy(), outputs=len(classes), batch_loss=batch_loss, start=start)
        self.classes_ = classes
        return self

    def predict_proba(self, X, times=None) -> np.ndarray:
        """Class probabilities ``(n, n_classes)``, columns in the order of ``classes_``."""
        return torch.softmax(self._outputs(X, times).double(), dim=-1).numpy()

    def predict(self, X, times=None) -> np.ndarray:
        """The most probable label of each series (labels as given to ``fit``)."""
        index = self._outputs(X, times).argmax(-1).numpy()
        return self.classes_[index]

    def score(self, X, y, sample_weight=None, times=None) -> float:
        """Accuracy; ``ValueError`` when ``y`` holds a label not seen in ``fit``."""
        check_is_fitted(self, "classes_")
        targets.encode_labels(y, self.classes_)
        return float(accuracy_score(y, self.predict(X, times), sample_weight=sample_weight))


class SeriesRegressor(RegressorMixin, SeriesEstimator):
    """A series regressor: ``fit(X, y)`` with ``y`` ``(n,)`` or ``(n, k)``, ``predict``, ``score`` (R²)."""

    def fit(self, X, y, times=None) -> "SeriesRegressor":
        """Train on series ``X`` with real targets ``y`` (standardised with the fit targets' statistics)."""
        start = time.perf_counter()
        data = self._read(X, times, fitted=False)
        warm = self.warm_start and hasattr(self, "target_scaling_")
        scaled, stats, one_d = targets.regression_targets(y, type(self).__name__,
                                                          self.target_scaling_ if warm else None)

        def batch_loss(model, xb, yb):
            return F.mse_loss(self._forward(model, xb), yb)

        self._fit(data, scaled, stratify=None, outputs=scaled.shape[1], batch_loss=batch_loss, start=start)
        self.target_scaling_, self.n_outputs_, self.target_one_d_ = stats, scaled.shape[1], one_d
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # y may be (n, k)
        return tags

    def predict(self, X, times=None) -> np.ndarray:
        """Predicted targets, ``(n,)`` if ``fit`` saw a 1-D ``y``, else ``(n, k)``."""
        out = self._outputs(X, times).double().numpy() * self.target_scaling_[1] + self.target_scaling_[0]
        return out[:, 0] if self.target_one_d_ else out

    def score(self, X, y, sample_weight=None, times=None) -> float:
        """The coefficient of determination R² of ``predict(X)``."""
        return float(r2_score(y, self.predict(X, times), sample_weight=sample_weight))

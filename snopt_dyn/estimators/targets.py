"""Targets: class labels <-> indices for the classifiers, standardised values for the regressor."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from sklearn.utils import assert_all_finite
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, column_or_1d
from torch import Tensor

__all__ = ["class_targets", "encode_labels", "regression_targets", "check_y_length"]


def _require_y(y, name: str) -> None:
    if y is None:
        raise ValueError(f"{name} requires y to be passed, but the target y is None")


def check_y_length(n_x: int, y: np.ndarray) -> None:
    if len(y) != n_x:
        raise ValueError(f"X holds {n_x} series but y has {len(y)} targets (len(X) != len(y))")


def class_targets(y, name: str, classes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Tensor]:
    """``(classes_, indices)`` for fit targets ``y``; with ``classes`` (a warm start) labels must be among them."""
    _require_y(y, name)
    y = column_or_1d(np.asarray(y), warn=True)
    if y.dtype.kind in "fc":
        assert_all_finite(y, input_name="y")
    check_classification_targets(y)
    found = np.unique(y)
    if classes is None:
        if len(found) < 2:
            raise ValueError(f"y has only one class ({found[0]!r} if any); a classifier needs at least 2 classes"
                             if len(found) else "y is empty")
        classes = found
    return classes, encode_labels(y, classes)


def encode_labels(y, classes: np.ndarray) -> Tensor:
    """Indices of ``y`` in ``classes``; ``ValueError`` naming the labels not seen in ``fit``."""
    y = column_or_1d(np.asarray(y))
    unseen = np.setdiff1d(y, classes)
    if len(unseen):
        raise ValueError(f"y contains labels not seen in fit: {unseen.tolist()[:10]}; known: {classes.tolist()[:20]}")
    return torch.as_tensor(np.searchsorted(classes, y), dtype=torch.long)


def regression_targets(y, name: str, stats: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    """``(y (n, k) float32 standardised, (mean, std), one_d)``; ``stats`` reuses a warm start's scaling."""
    _require_y(y, name)
    y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
    one_d = y.ndim == 1
    y2 = y[:, None] if one_d else y
    if stats is None:
        std = y2.std(axis=0)
        stats = (y2.mean(axis=0), np.where(std > 0, std, 1.0))
    if y2.shape[1] != len(stats[0]):
        raise ValueError(f"y has {y2.shape[1]} outputs but the estimator was fitted with {len(stats[0])}")
    scaled = (y2 - stats[0]) / stats[1]
    return torch.as_tensor(scaled, dtype=torch.float32), stats, one_d

"""The ggplot2 ``diamonds`` data as a 7-dimensional density-estimation target.

Stored raw (float32, original row order) with a fixed 80/10/10 train/val/test
assignment per row (drawn once at conversion time with the seed stored in the
file). Preprocessing happens at load time and is deterministic:

1. ``log_transform``: natural log of ``carat`` and ``price`` (both strictly
   positive and heavily right-skewed); the other columns are unchanged.
2. ``standardize``: subtract the per-column mean and divide by the
   per-column (population) standard deviation of the *train* split, computed
   after step 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._io import check_split, load_arrays

__all__ = ["DIAMONDS_COLUMNS", "DIAMONDS_LOG_COLUMNS", "load_diamonds", "diamonds_statistics"]

DIAMONDS_COLUMNS: tuple[str, ...] = ("carat", "depth", "table", "price", "x", "y", "z")
DIAMONDS_LOG_COLUMNS: tuple[str, ...] = ("carat", "price")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _raw(split: str, log_transform: bool) -> np.ndarray:
    check_split(split, set(_SPLIT_CODES))
    arrays = load_arrays("diamonds.npz")
    values = arrays["values"][arrays["split"] == _SPLIT_CODES[split]].astype(np.float64)
    if log_transform:
        for name in DIAMONDS_LOG_COLUMNS:
            column = DIAMONDS_COLUMNS.index(name)
            values[:, column] = np.log(values[:, column])
    return values


def diamonds_statistics(log_transform: bool = True) -> tuple[Tensor, Tensor]:
    """Per-column mean and std of the train split (after the optional log).

    Why: to map standardised samples of a flow back to the original units
    (``x * std + mean``, then ``exp`` of the log columns).
    """
    train = _raw("train", log_transform)
    return torch.from_numpy(train.mean(0)).float(), torch.from_numpy(train.std(0)).float()


def load_diamonds(
    split: str = "train", *, log_transform: bool = True, standardize: bool = True
) -> Tensor:
    """The 7 numeric diamonds columns as ``(N, 7)`` float32 (see module doc).

    Why: a real, skewed, correlated tabular density for testing normalising
    flows (e.g. FFJORD) on something other than toy 2-D data.

    Args:
        split: ``"train"`` (43,152 rows), ``"val"`` (5,394) or ``"test"``
            (5,394); rows keep the original csv order within a split.
        log_transform: take ``log`` of carat and price first.
        standardize: standardise with the train split's statistics.
    """
    values = _raw(split, log_transform)
    if standardize:
        train = _raw("train", log_transform)
        values = (values - train.mean(0)) / train.std(0)
    return torch.from_numpy(values.astype(np.float32))

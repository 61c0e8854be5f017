"""Validation and conversion of the series forms users pass to the estimators.

Accepted ``X`` (every form is "one entry per series"):

* a 3-D array ``(n, length, channels)`` (numpy, torch or anything ``np.asarray`` reads);
* a 2-D array ``(n, length)``: ``n`` univariate series (the aeon/tslearn convention), so tabular
  scikit-learn data is read as series whose "features" are time steps;
* a list (or tuple) of ``(L_i, channels)`` or ``(L_i,)`` arrays of different lengths.

``NaN`` marks a missing observation (irregular sampling); a series with no observed value at all is an
error.  Optional ``times``: a ``(length,)`` array shared by all series, an ``(n, length)`` array or a
list of ``(L_i,)`` arrays; finite and strictly increasing per series.  Times are taken relative to each
series' first time step (a series' clock starts at 0).
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

import numpy as np
import torch

from snopt_dyn import datasets

__all__ = ["read_series", "read_times"]


def _is_sparse(X) -> bool:
    from scipy import sparse  # a dependency of scikit-learn, which this subpackage needs anyway

    return sparse.issparse(X)


def _as_float(array, what: str) -> np.ndarray:
    """``array`` as float64; a clear ``ValueError`` for complex or non-numeric data."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if np.iscomplexobj(array):
        raise ValueError(f"Complex data not supported: {what} has dtype {array.dtype}")
    try:
        return array.astype(np.float64)
    except TypeError as exc:
        raise TypeError(f"{what} must hold numbers (NaN for missing): {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{what} must hold numbers (NaN for missing): {exc}") from None


def _split_series(X) -> List[np.ndarray]:
    """One float64 ``(L_i, C)`` array per series, for every accepted form of ``X``."""
    if X is None:
        raise ValueError("X is None; pass the series as a (n, length, channels) array, an (n, length) array "
                         "of univariate series or a list of (length_i, channels) arrays")
    if _is_sparse(X):
        raise TypeError("sparse input is not supported: series are dense; pass X.toarray()")
    ragged = isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype == object and X.ndim == 1)
    if ragged:
        series = [_as_float(s, f"series {i} of X") for i, s in enumerate(X)]
    else:
        array = _as_float(X, "X")
        if array.ndim not in (2, 3):
            raise ValueError(f"Reshape your data: X must be 3-D (n, length, channels), 2-D (n, length: univariate series) or a "
                             f"list of (length_i, channels) arrays; got a {array.ndim}-D array of shape "
                             f"{array.shape}. Reshape a single series with X[None] (or X.reshape(1, -1)).")
        series = list(array)
    for i, s in enumerate(series):
        if s.ndim not in (1, 2):
            raise ValueError(f"series {i} of X must be 1-D (length,) or 2-D (length, channels), got shape {s.shape}")
    return [s[:, None] if s.ndim == 1 else s for s in series]


def _check_series(series: List[np.ndarray]) -> None:
    if len(series) == 0:
        raise ValueError("X holds 0 series (n_samples = 0); at least one is required")
    channels = {s.shape[1] for s in series}
    if len(channels) != 1:
        raise ValueError(f"every series of X needs the same number of channels, got {sorted(channels)}")
    if 0 in channels:
        raise ValueError("X has 0 channels (0 features); each series needs at least one")
    if all(s.shape[0] == 0 for s in series):
        raise ValueError(f"X has no time step: 0 feature(s) (shape=({len(series)}, 0)) while a minimum of 1 is "
                         "required (a 2-D X holds univariate series, one time step per column)")
    for i, s in enumerate(series):
        if s.shape[0] == 0:
            raise ValueError(f"series {i} of X has no time step (length 0)")
        if np.isinf(s).any():
            raise ValueError(f"X contains infinity (series {i}); mark missing values with NaN instead")
        if np.isnan(s).all():
            raise ValueError(f"series {i} of X is all NaN: it has no observed value; drop it or impute it")


def read_times(times, lengths: Sequence[int]) -> List[np.ndarray]:
    """Per-series observation times (float64, starting at 0); index times ``0..L_i-1`` when ``None``."""
    if times is None:
        return [np.arange(n, dtype=np.float64) for n in lengths]
    ragged = isinstance(times, (list, tuple)) or (isinstance(times, np.ndarray) and times.dtype == object
                                                  and times.ndim == 1)
    if ragged:
        rows = [_as_float(t, f"times[{i}]").reshape(-1) for i, t in enumerate(times)]
    else:
        array = _as_float(times, "times")
        if array.ndim == 1 and len(set(lengths)) == 1:
            rows = [array] * len(lengths)
        elif array.ndim == 2:
            rows = list(array)
        else:
            raise ValueError(f"times must be (length,) (shared; only when all series have the same length), "
                             f"(n, length) or a list of (length_i,) arrays; got shape {array.shape}")
    if len(rows) != len(lengths):
        raise ValueError(f"times gives {len(rows)} series but X has {len(lengths)}")
    out = []
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row.shape[0] != n:
            raise ValueError(f"times[{i}] has {row.shape[0]} entries but series {i} of X has length {n}")
        if not np.isfinite(row).all():
            raise ValueError(f"times[{i}] must be finite (a missing value is a NaN in X, not in times)")
        if n > 1 and not (np.diff(row) > 0).all():
            raise ValueError(f"times[{i}] must be strictly increasing")
        out.append(row - row[0])
    return out


def read_series(X, times=None) -> datasets.TimeSeriesData:
    """``X`` (and ``times``) as a padded :class:`~snopt_dyn.datasets.TimeSeriesData` (labels all 0).

    Padding follows :func:`snopt_dyn.datasets.from_sequences`: the last observation (and the last time)
    repeats after a series ends, so a spline through it is flat there.  Raises ``ValueError`` (or
    ``TypeError`` for sparse input) naming the problem.
    """
    series = _split_series(X)
    _check_series(series)
    lengths = [s.shape[0] for s in series]
    rows = read_times(times, lengths)
    data = datasets.from_sequences(series, labels=np.zeros(len(series), dtype=np.int64), classes=["0"])
    padded = np.stack([np.concatenate([r, np.full(data.max_length - r.shape[0], r[-1])]) for r in rows])
    return dataclasses.replace(data, times=torch.as_tensor(padded, dtype=torch.float32))



"""Padded, possibly irregular multivariate time series in the Neural CDE layout.

The conventions follow Kidger et al., "Neural Controlled Differential Equations
for Irregular Time Series" (NeurIPS 2020) and the ``torchcde`` package:

* ``NaN`` marks a missing value. Dropping an observation sets the whole time
  step (all channels) to ``NaN``; the time itself is kept, so a time channel
  added by :func:`with_time_channel` is never missing.
* Series shorter than the longest one are padded *after their end* by repeating
  the last observed value of each channel (last observation carried forward),
  and the time stamps are padded with the last time as well. An interpolating
  spline through the padded series is therefore flat after the end, and with a
  time channel the control path stops moving there: a CDE state evaluated at
  the common final time equals the state at the series' own final time.

Only ``torch``/``numpy`` are used, so the data needs nothing else at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TimeSeriesData",
    "from_sequences",
    "drop_observations",
    "with_time_channel",
    "channel_statistics",
    "standardize",
]


@dataclass(frozen=True)
class TimeSeriesData:
    """A batch of labelled multivariate series, padded to a common length.

    Attributes:
        values: ``(N, L_max, C)`` float32. ``NaN`` = missing. Positions at or
            after a series' length repeat that series' last observed value
            (per channel), so splines through them stay flat.
        times: ``(N, L_max)`` float32 observation index ``0..L-1`` of each
            series, padded with ``L-1``.
        lengths: ``(N,)`` int64 number of time steps of each series (including
            steps whose values were dropped/missing).
        mask: ``(N, L_max)`` bool, True where a time step lies inside the
            series and at least one channel is observed (not ``NaN``).
        labels: ``(N,)`` int64 class index in ``0..K-1``.
        classes: the original class labels; ``classes[k]`` is the label of
            index ``k``. Indices follow the sorted order of the labels
            (numeric order when every label parses as a number).
    """

    values: Tensor
    times: Tensor
    lengths: Tensor
    mask: Tensor
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        n, length, _ = self.values.shape
        if self.times.shape != (n, length) or self.mask.shape != (n, length):
            raise ValueError("times and mask must have shape (N, L_max) matching values")
        if self.lengths.shape != (n,) or self.labels.shape != (n,):
            raise ValueError("lengths and labels must have shape (N,)")

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (labels are in ``0..K-1``)."""
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        """Number of data channels ``C`` (without any time channel)."""
        return int(self.values.shape[-1])

    @property
    def max_length(self) -> int:
        """Padded length ``L_max``."""
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def as_lists(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The series as users hold them, without padding: a list of ``(length_i, C)`` arrays, and
        their original labels (``classes[labels]``), e.g. for the scikit-learn estimators."""
        series = [self.values[i, :int(self.lengths[i])].numpy() for i in range(len(self))]
        return series, np.array(self.classes)[self.labels.numpy()]

    def subset(self, index: Tensor | Sequence[int] | slice) -> TimeSeriesData:
        """Select series (e.g. a minibatch) keeping the padding to ``L_max``."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return dataclasses.replace(
            self,
            values=self.values[index],
            times=self.times[index],
            lengths=self.lengths[index],
            mask=self.mask[index],
            labels=self.labels[index],
        )


def _inside(lengths: Tensor, max_length: int) -> Tensor:
    """``(N, L_max)`` bool: True for time steps before each series' end."""
    return torch.arange(max_length)[None, :] < lengths[:, None]


def _fill_tail(values: Tensor, lengths: Tensor) -> Tensor:
    """Overwrite positions ``t >= length`` with the last observed value per channel.

    Whatever was in the tail before is ignored, so this also re-pads after
    observations were dropped (no dropped value can leak into the padding).
    A channel with no observation at all stays ``NaN``.
    """
    n, max_length, channels = values.shape
    inside = _inside(lengths, max_length)
    observed = inside[:, :, None] & ~torch.isnan(values)
    steps = torch.arange(max_length)[None, :, None].expand(n, max_length, channels)
    last = torch.where(observed, steps, torch.full_like(steps, -1)).amax(dim=1)  # (N, C)
    fill = torch.gather(values, 1, last.clamp(min=0)[:, None, :])  # (N, 1, C)
    fill = torch.where(last[:, None, :] >= 0, fill, torch.full_like(fill, float("nan")))
    return torch.where(inside[:, :, None], values, fill.expand(n, max_length, channels))


def _mask(values: Tensor, lengths: Tensor) -> Tensor:
    inside = _inside(lengths, values.shape[1])
    return inside & ~torch.isnan(values).all(dim=-1)


def _as_float_tensor(sequence: np.ndarray | Tensor) -> Tensor:
    if isinstance(sequence, Tensor):
        return sequence.detach().to(torch.float32)
    return torch.from_numpy(np.array(sequence, dtype=np.float32))  # copy: source may be read-only


def from_sequences(
    sequences: Sequence[np.ndarray | Tensor],
    labels: Sequence[int] | Tensor,
    classes: Sequence[str],
) -> TimeSeriesData:
    """Pad variable-length ``(L_i, C)`` arrays into a :class:`TimeSeriesData`.

    Args:
        sequences: one ``(L_i, C)`` array per series (``NaN`` = missing).
        labels: class indices in ``0..len(classes)-1``.
        classes: original class labels in index order.
    """
    if len(sequences) == 0:
        raise ValueError("need at least one series")
    arrays = [_as_float_tensor(s) for s in sequences]
    channels = {a.shape[1] if a.ndim == 2 else -1 for a in arrays}
    if len(channels) != 1 or -1 in channels:
        raise ValueError("every sequence must be a 2-D (length, channels) array with the same channels")
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.int64)
    if int(lengths.min()) < 1:
        raise ValueError("every sequence needs at least one time step")
    max_length = int(lengths.max())
    values = torch.full((len(arrays), max_length, channels.pop()), float("nan"))
    for i, a in enumerate(arrays):
        values[i, : a.shape[0]] = a
    values = _fill_tail(values, lengths)
    steps = torch.arange(max_length, dtype=torch.float32)[None, :]
    times = torch.minimum(steps, (lengths - 1).to(torch.float32)[:, None])
    if isinstance(labels, Tensor):
        labels_t = labels.to(torch.int64).reshape(-1)
    else:
        labels_t = torch.from_numpy(np.array(labels, dtype=np.int64).reshape(-1))
    if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= len(classes)):
        raise ValueError("labels must lie in 0..len(classes)-1")
    return TimeSeriesData(
        values=values,
        times=times,
        lengths=lengths,
        mask=_mask(values, lengths),
        labels=labels_t,
        classes=[str(c) for c in classes],
    )


def drop_observations(data: TimeSeriesData, fraction: float, seed: int = 0) -> TimeSeriesData:
    """Apply the irregular-sampling protocol: drop a fraction of each series' steps.

    Why: Kidger et al. (2020) evaluate Neural CDEs on UEA data with 30%, 50% and
    70% of the observations removed at random; this reproduces that protocol
    deterministically.

    For each series (in order, with one ``torch.Generator`` seeded by ``seed``)
    ``floor(fraction * n_observed)`` of its currently observed time steps are
    chosen uniformly without replacement and all their channels are set to
    ``NaN``; ``mask`` is updated, ``times`` and ``lengths`` are unchanged, and
    the padding after the end is recomputed from the last *remaining*
    observation.

    Args:
        data: the series to thin out (not modified).
        fraction: in ``[0, 1)``; e.g. 0.3, 0.5 or 0.7.
        seed: seed of the generator, so the same call gives the same result.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError("fraction must lie in [0, 1)")
    generator = torch.Generator().manual_seed(int(seed))
    values = data.values.clone()
    for i in range(len(data)):
        observed = torch.nonzero(data.mask[i]).flatten()
        count = math.floor(fraction * observed.numel() + 1e-9)
        if count:
            chosen = torch.randperm(observed.numel(), generator=generator)[:count]
            values[i, observed[chosen]] = float("nan")
    values = _fill_tail(values, data.lengths)
    return dataclasses.replace(data, values=values, mask=_mask(values, data.lengths))


def with_time_channel(data: TimeSeriesData, time_scale: float | None = None) -> Tensor:
    """Return ``(N, L_max, 1 + C)`` with normalised time as channel 0.

    Why: a Neural CDE needs time as a channel of the control path (Kidger et
    al. 2020) so that the path is monotone in time even where data are
    missing; dropped values stay ``NaN`` but the time channel is never missing.

    Args:
        data: the series.
        time_scale: the time channel is ``times / time_scale``. Defaults to the
            largest time in ``data`` (so it lies in ``[0, 1]``); pass the same
            value for train and test when their maximal lengths differ.
    """
    if time_scale is None:
        time_scale = max(float(data.times.max()), 1.0)
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    time = (data.times / time_scale).unsqueeze(-1)
    return torch.cat([time, data.values], dim=-1)


def channel_statistics(data: TimeSeriesData) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of the observed values.

    Only values inside each series and not ``NaN`` count; the padding is
    excluded because it would over-weight each series' last value. A channel
    with zero spread (or no observation) gets standard deviation 1.
    """
    inside = _inside(data.lengths, data.max_length)[:, :, None]
    observed = inside & ~torch.isnan(data.values)
    x = torch.where(observed, data.values, torch.zeros_like(data.values)).double()
    count = observed.sum(dim=(0, 1)).double()
    mean = x.sum(dim=(0, 1)) / count.clamp(min=1)
    squared = torch.where(observed, (x - mean) ** 2, torch.zeros_like(x))
    std = torch.sqrt(squared.sum(dim=(0, 1)) / count.clamp(min=1))
    std = torch.where((std > 0) & (count > 0), std, torch.ones_like(std))
    return mean.float(), std.float()


def standardize(
    data: TimeSeriesData, mean: Tensor | None = None, std: Tensor | None = None
) -> TimeSeriesData:
    """Return ``(values - mean) / std`` per channel; ``NaN`` stays ``NaN``.

    Pass the statistics of the *training* split (see
    :func:`channel_statistics`) when standardising a test split; without them
    the statistics of ``data`` itself are used. The padding keeps repeating the
    last observation because the map is affine.
    """
    if mean is None or std is None:
        own_mean, own_std = channel_statistics(data)
        mean = own_mean if mean is None else mean
        std = own_std if std is None else std
    values = (data.values - mean.to(data.values)) / std.to(data.values)
    return dataclasses.replace(data, values=values)

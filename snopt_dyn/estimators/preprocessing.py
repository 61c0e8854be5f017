"""The main job's preprocessing, fitted on ``fit`` data only and applied unchanged at predict time.

* per-channel standardisation with the fit data's mean and standard deviation
  (:func:`snopt_dyn.datasets.channel_statistics`, padding and NaN excluded);
* a time channel, scaled so that the fit data's longest series spans ``[0, 1]``
  (:func:`snopt_dyn.datasets.with_time_channel`);
* for the Neural CDE: torchcde's Hermite cubic spline with backward differences, built per series
  on its own steps and constant after its end, so a shorter series' CDE state stays put there
  (exactly: dX = 0) and padding cannot change its output;
* for the ODE-RNN: values with NaN -> 0 (the standardised mean), the observation mask, and times in
  units of the fit data's median gap (so gaps are ~1 as with index times).

A channel with no observation in a series reads as the training mean (torchcde's constant path /
the ODE-RNN's zero), i.e. 0 after standardisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from snopt_dyn import datasets

__all__ = ["Scaling", "fit_scaling", "cde_coefficients", "odernn_inputs"]


@dataclass(frozen=True)
class Scaling:
    """What ``fit`` learnt about its series: channel statistics and the time scales."""

    mean: Tensor  # (C,)
    std: Tensor  # (C,)
    time_span: float  # longest fit series' duration: the time channel is t / time_span
    time_unit: float  # median gap between consecutive fit time steps: ODE-RNN gaps are in this unit

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


def fit_scaling(data: datasets.TimeSeriesData) -> Scaling:
    """Statistics of ``data`` (the fit series) for :func:`cde_coefficients` and :func:`odernn_inputs`."""
    mean, std = datasets.channel_statistics(data)
    span = float(data.times.max())
    gaps = data.times[:, 1:] - data.times[:, :-1]
    gaps = gaps[gaps > 0]
    unit = float(gaps.median()) if gaps.numel() else 1.0
    return Scaling(mean=mean, std=std, time_span=span if span > 0 else 1.0, time_unit=unit)


def _standardised(data: datasets.TimeSeriesData, scaling: Scaling) -> datasets.TimeSeriesData:
    return datasets.standardize(data, scaling.mean, scaling.std)


def cde_coefficients(data: datasets.TimeSeriesData, scaling: Scaling) -> Tensor:
    """Hermite spline coefficients ``(n, L - 1, 4 (C + 1))`` of the standardised series plus time.

    Each series' spline is built on its own steps; after its end the pieces are constant.  (A spline
    through the padded series would not be flat on the first padded interval: backward differences
    carry the last slope into it, a bump that moves the CDE state and the time channel.)
    """
    x = datasets.with_time_channel(_standardised(data, scaling), time_scale=scaling.time_span)
    return datasets.hermite_coefficients(x, data.lengths)


def odernn_inputs(data: datasets.TimeSeriesData, scaling: Scaling) -> Tensor:
    """``(n, L, C + 2)``: standardised values (NaN -> 0), mask and time, packed for one tensor batch."""
    values = torch.nan_to_num(_standardised(data, scaling).values)
    mask = data.mask.unsqueeze(-1).to(values.dtype)
    times = (data.times / scaling.time_unit).unsqueeze(-1).to(values.dtype)
    return torch.cat([values, mask, times], dim=-1)

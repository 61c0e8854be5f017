"""The canonical torchcde Neural CDE classifier (Kidger et al. 2020), written as its users write it.

torchcde is imported on first use; it is bound to the module global ``torchcde`` so that the model's
code refers to ``torchcde.cdeint`` exactly as user code does (``snopt_dyn.wrap`` finds it there).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..optional import require

torchcde = None


def import_torchcde():
    """torchcde, imported once; a clear error when the optional dependency is missing."""
    global torchcde
    if torchcde is None:
        torchcde = require("torchcde", "the Neural CDE", "torchcde")
    return torchcde


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
        import_torchcde()
        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        z = torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=True,
                            method="dopri5", rtol=self.rtol, atol=self.atol)
        return self.readout(z[:, -1])

"""torchcde adapter: Neural CDEs solved by ``torchcde.cdeint`` run on the engine adjoint.

torchcde 0.2.5's ``cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs)`` wraps
``func`` in a ``_VectorField`` module (``func(t, z) @ dX/dt``) and calls ``torchdiffeq.odeint_adjoint``
(``adjoint=True``) or ``torchdiffeq.odeint`` (``adjoint=False``), looked up on the ``torchdiffeq``
module at call time.  So the torchdiffeq adapter's patch of those two module attributes, active
while the wrapped model's forward runs, is all a Neural CDE needs, whichever way the user spelled
the call (``torchcde.cdeint`` or ``from torchcde import cdeint``):

* ``adjoint=True``: torchcde's defaults (``atol=1e-6``, ``rtol=1e-4``, adjoint tolerances equal to
  them) and ``adjoint_params`` (often the spline coefficients too) reach the engine unchanged.
* ``adjoint=False``: the engine adjoint replaces back-propagation through the solver; the
  ``_VectorField``'s parameters and any spline coefficients that require grad (buffers of the
  interpolation module) receive gradients.
* ``backend="torchsde"`` is not intercepted (SDE support is a later phase): it runs as before.

The terminal time of a CDE is the end of the data's interval, so ``wrap(...,
train_terminal_time=True)`` is refused for CDE models.
"""
from __future__ import annotations

from torch import nn

from ..wrapping import WrapOptions
from . import torchdiffeq as _torchdiffeq


def install(model: nn.Module, options: WrapOptions) -> None:
    """Register the torchdiffeq adapter's hooks on ``model`` (idempotent)."""
    _torchdiffeq.install(model, options)

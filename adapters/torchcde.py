"""torchcde adapter: Neural CDEs solved by ``torchcde.cdeint`` run on the engine adjoint.

torchcde 0.2.5's ``cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs)`` wraps
``func`` in a ``_VectorField`` module (``func(t, z) @ dX/dt``) and calls ``torchdiffeq.odeint_adjoint``
(``adjoint=True``) or ``torchdiffeq.odeint`` (``adjoint=False``), looked up on the ``torchdiffeq``
module at call time.  The ``_VectorField`` *contains* the user's (wrapped) field, so the torchdiffeq
adapter's stand-ins route it to the engine, whichever way the user spelled the call
(``torchcde.cdeint`` or ``from torchcde import cdeint``) and wherever it is made:

* ``adjoint=True``: torchcde's defaults (``atol=1e-6``, ``rtol=1e-4``, adjoint tolerances equal to
  them) and ``adjoint_params`` (often the spline coefficients too) reach the engine unchanged.
* ``adjoint=False``: the engine adjoint replaces back-propagation through the solver; the
  ``_VectorField``'s parameters and any spline coefficients that require grad (buffers of the
  interpolation module) receive gradients.
* ``backend="torchsde"`` (an ODE on torchsde's solvers) goes through ``torchsde.sdeint`` /
  ``sdeint_adjoint``, which :mod:`snopt_dyn.adapters.torchsde` routes to the engine's SDE adjoint
  (``adjoint=True``; plain ``sdeint`` where the engine is exact, see that module).

The terminal time of a CDE is the end of the data's interval, so ``wrap(...,
train_terminal_time=True)`` is refused for CDE models.
"""
from __future__ import annotations

from typing import List

from torch import nn

from . import torchdiffeq as _torchdiffeq


def install(model: nn.Module) -> List[str]:
    """Install the torchdiffeq adapter's stand-ins (idempotent); return the solver attributes rebound."""
    return _torchdiffeq.install(model)

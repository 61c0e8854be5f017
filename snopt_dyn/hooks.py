"""How the preconditioner (or any observer) watches the engine's solves.

The engine announces each forward solve, and on the backward pass asks every observer whether it
wants *samples*: evaluations of the vector field at chosen times ``t_j`` with the state ``z(t_j)``
and the adjoint ``a(t_j)`` taken from the backward solve.  The observer receives them in
:meth:`EngineObserver.on_samples` and may evaluate the field once more with ``a(t_j)``
back-propagated through it.  When nobody asks, the backward pass does no extra work.

SDE solves (:func:`snopt_dyn.sdeint_adjoint`) use a protocol of their own, by duck typing: an observer
that defines ``sde_sample_spec(sde)`` and ``on_sde_samples(sde, batch)`` gets the samples with the
Brownian increments of their cells (:mod:`snopt_dyn.sde_sampling`); :class:`snopt_dyn.SNOpt` implements
both (:mod:`snopt_dyn.curvature.sde_pairing`).

The engine also records, per thread, in which *phase* a field evaluation happens, so that forward
hooks on layers can tell a sampling evaluation from solver evaluations and from ordinary
(non-ODE) forward calls.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

OUTSIDE = "outside"   # not inside any engine solve: ordinary forward/backward of the model
SOLVE = "solve"       # field evaluations of the forward or backward solve (never sampled)
SAMPLE = "sample"     # evaluations an observer makes inside on_samples

_local = threading.local()


def current_phase() -> str:
    """The phase of field evaluation on this thread (``OUTSIDE``, ``SOLVE`` or ``SAMPLE``)."""
    return getattr(_local, "phase", OUTSIDE)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the evaluations made inside the ``with`` block as belonging to phase ``name``."""
    previous = current_phase()
    _local.phase = name
    try:
        yield
    finally:
        _local.phase = previous


@dataclass(frozen=True)
class SampleSpec:
    """Which times to sample on ``[t0, T]``: either a sample ``step`` Δ or a ``count`` J.

    The J times are the midpoints of J equal cells of ``[t0, T]`` (midpoint quadrature), and the
    quadrature weight of each is the cell width ``|T - t0| / J``.
    """

    step: Optional[float] = None
    count: Optional[int] = None

    def __post_init__(self):
        if (self.step is None) == (self.count is None):
            raise ValueError("SampleSpec needs exactly one of step= or count=")
        if self.step is not None and not self.step > 0:
            raise ValueError(f"sample step must be positive, got {self.step}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"sample count must be at least 1, got {self.count}")

    def host_times(self, t0: float, t1: float) -> Tuple[List[float], float]:
        """Sample times as Python floats (ordered from ``t0`` to ``t1``) and the quadrature weight;
        the engine plans its backward segments with these, without touching the device."""
        span = t1 - t0
        count = self.count if self.count is not None else max(1, int(round(abs(span) / self.step)))
        cell = span / count
        return [t0 + cell * (j + 0.5) for j in range(count)], abs(cell)

    def times(self, t0: float, t1: float, device: Optional[torch.device] = None) -> Tuple[Tensor, float]:
        """Sample times (float64, ordered from ``t0`` to ``t1``, on ``device``) and the quadrature weight."""
        times, weight = self.host_times(t0, t1)
        return torch.tensor(times, dtype=torch.float64, device=device), weight


@dataclass
class SampleBatch:
    """States and adjoints at sample times, from one backward solve of one field.

    ``states[j]`` and ``adjoints[j]`` have the shape of the solve's ``y0``.  ``weights[j]`` is the
    quadrature weight of sample ``j`` (shape ``(J,)``, on the state's device, the dtype of
    ``times``); ``sum(weights) == |T - t0|``, so ``sum_j weights[j] * h(t_j)`` approximates the
    integral of ``h`` over the solve.  ``weight`` is their mean, kept for observers written when all
    samples shared one weight.  Give either one when building a batch by hand; the other is derived.
    ``evaluate(j)`` is not provided on purpose: the observer calls the field itself so that it
    controls what autograd records.
    """

    times: Tensor
    states: Tensor
    adjoints: Tensor
    weight: Optional[float] = None
    weights: Optional[Tensor] = None

    def __post_init__(self):
        if self.weights is None:
            if self.weight is None:
                raise ValueError("SampleBatch needs weights= (per-sample quadrature weights) or weight=")
            self.weights = torch.full((len(self.times),), float(self.weight), dtype=self.times.dtype,
                                      device=self.times.device)
        elif self.weight is None:
            # one host sync per batch (not per sample): the mean, for observers that read one weight
            self.weight = float(self.weights.mean()) if len(self.weights) else 0.0


class EngineObserver:
    """Base class for objects that watch engine solves.  Override what you need.

    Observers are held weakly: register one with :func:`register_observer` and it stays registered
    for as long as the object is alive (or until the returned handle's ``remove()``).
    """

    def on_forward(self, func: torch.nn.Module, y0: Tensor, t: Tensor) -> None:
        """Called once per forward solve, before solving."""

    def sample_spec(self, func: torch.nn.Module) -> Optional[SampleSpec]:
        """Return a :class:`SampleSpec` to receive samples on this backward pass, else ``None``."""
        return None

    def on_samples(self, func: torch.nn.Module, batch: SampleBatch) -> None:
        """Receive the samples asked for; field evaluations made here run in phase ``SAMPLE``."""


_observers: "weakref.WeakSet[EngineObserver]" = weakref.WeakSet()


class _Handle:
    def __init__(self, obs: EngineObserver):
        self._ref = weakref.ref(obs)

    def remove(self) -> None:
        obs = self._ref()
        if obs is not None:
            _observers.discard(obs)


def register_observer(observer: EngineObserver) -> _Handle:
    """Register ``observer`` (weakly) for all engine solves in this process."""
    _observers.add(observer)
    return _Handle(observer)


def observers() -> List[EngineObserver]:
    return list(_observers)

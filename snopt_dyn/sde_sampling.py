"""Samples of an SDE's backward pass: ``(t_j, z(t_j), a(t_j))`` and the Brownian increment ``ΔW_j``.

The SDE counterpart of :mod:`snopt_dyn.sampling`, for observers of :mod:`snopt_dyn.hooks` that opt in
with two methods (an ODE observer, which has neither, is never asked about SDE solves)::

    def sde_sample_spec(self, sde) -> Optional[hooks.SampleSpec]   # on this backward pass?
    def on_sde_samples(self, sde, batch: SDESampleBatch) -> None   # evaluations here: phase SAMPLE

``sde`` is the module the user passed to ``sdeint_adjoint``.  The sample times are the midpoints of
J equal cells of ``[t0, T]``: a diffusion layer's gradient is a Stratonovich integral, and sums over
cells converge to it only with ``(z, a)`` at the cell midpoint and ``ΔW`` over the whole cell.  They
are extra output times of the backward segments' solves, which torchsde's ``integrate`` reads by
linear interpolation without changing its steps (``next_t = min(t + dt, segment end)``), so a
sampled backward pass gives bit for bit the gradient of an unsampled one.  The increments ``ΔW_j``
are read from the same Brownian object after the backward solve, so they cannot change any increment
the solver used.  :class:`snopt_dyn.SNOpt` is the observer that uses them
(:mod:`snopt_dyn.curvature.sde_pairing`: drift rows ``a``, diffusion rows ``a ⊙ ΔW`` or ``a ΔWᵀ``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
from torch import Tensor

from . import hooks
from .sampling import Sampler, _Request


@dataclass
class SDESampleBatch:
    """States, adjoints and Brownian increments at the sample times of one backward pass.

    ``states[j]``/``adjoints[j]`` have the shape of the solved state ``(B, d)`` (with ``logqp=True``
    the log-ratio channel is the last one, as in torchsde's solve); ``increments[j]`` is
    ``ΔW_j = W(cell_j end) - W(cell_j start)`` of shape ``(B, m)``; ``weights[j]`` is the cell width
    ``Δt_j``.  ``forward_sde`` is torchsde's ``ForwardSDE`` that was solved (``names=`` and
    ``logqp`` applied): ``f``, ``g``, ``f_and_g`` and ``prod(g, v)`` evaluate it as the solver did.
    """

    times: Tensor
    states: Tensor
    adjoints: Tensor
    increments: Tensor
    weights: Tensor
    noise_type: str
    sde_type: str
    forward_sde: Any


def wants_samples() -> bool:
    """Whether any registered observer can take SDE samples (so that nothing is planned otherwise)."""
    return any(callable(getattr(obs, "sde_sample_spec", None)) for obs in hooks.observers())


class SDESampler(Sampler):
    """:class:`snopt_dyn.sampling.Sampler`'s segment plan, with requests from ``sde_sample_spec`` and
    batches that carry the Brownian increments."""

    def __init__(self, sde, t_host: Sequence[float]):
        self.t_host = list(t_host)
        self.requests: List[_Request] = []
        for obs in hooks.observers():
            ask = getattr(obs, "sde_sample_spec", None)
            spec = ask(sde) if callable(ask) and len(self.t_host) >= 2 else None
            if spec is not None:
                times, weight = spec.host_times(self.t_host[0], self.t_host[-1])
                self.requests.append(_Request(obs, times, weight))
        self.inner, self.plan = {}, {}
        for r, req in enumerate(self.requests):
            for j, tj in enumerate(req.times):
                self._assign(r, j, tj)
        for i, times in self.inner.items():
            self.inner[i] = sorted(set(times), reverse=True)  # the backward runs from t[i] down to t[i-1]

    def deliver(self, sde, forward_sde, bm, shape: torch.Size, dtype: torch.dtype) -> None:
        """Hand every observer its :class:`SDESampleBatch` (field evaluations in phase SAMPLE)."""
        t0, t1 = self.t_host[0], self.t_host[-1]
        for req in self.requests:
            count = len(req.times)
            if len(req.got) != count:
                raise RuntimeError("internal error: some sample times were not reached")
            edges = [t0 + (t1 - t0) * k / count for k in range(count)] + [t1]
            with torch.no_grad():
                increments = torch.stack([bm(edges[k], edges[k + 1]) for k in range(count)])
            device = increments.device
            batch = SDESampleBatch(
                times=torch.tensor(req.times, dtype=dtype, device=device),
                states=torch.stack([req.got[j][0] for j in range(count)]).reshape(count, *shape),
                adjoints=torch.stack([req.got[j][1] for j in range(count)]).reshape(count, *shape),
                increments=increments,
                weights=torch.tensor([edges[k + 1] - edges[k] for k in range(count)], dtype=dtype, device=device),
                noise_type=forward_sde.noise_type, sde_type=forward_sde.sde_type, forward_sde=forward_sde)
            with torch.enable_grad(), hooks.phase(hooks.SAMPLE):
                req.observer.on_sde_samples(sde, batch)


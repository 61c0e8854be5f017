"""Samples ``(t_j, z(t_j), a(t_j))`` of a backward pass for the observers that ask for them.

The sample times are the *requested* ones (:class:`hooks.SampleSpec`, midpoint cells, each weight
the cell width, so the weights sum to ``|T - t0|``).  They are never solver steps: each backward
segment asks its backend for them as dense outputs (``dense=True``), which by contract does not
change the steps, so a sampled backward pass gives bit-for-bit the gradient of an unsampled one and
the user's solver is never switched.  A sample at an output time ``t_k`` takes the forward state
``z(t_k)`` and the adjoint just after it, ``a(t_k+)``, before the loss's jump at ``t_k``.

All bookkeeping runs on host floats of the output times, taken once per solve, so nothing here
synchronises with the device per segment or per sample.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from . import hooks


class _Request:
    def __init__(self, observer: hooks.EngineObserver, times: List[float], weight: float):
        self.observer, self.times, self.weight = observer, times, weight
        self.got: Dict[int, Tuple[Tensor, Tensor]] = {}


class Sampler:
    """Who wants samples on this backward pass, which segment serves each, and the results."""

    def __init__(self, func: Callable, t_host: Sequence[float]):
        self.t_host = list(t_host)
        self.requests: List[_Request] = []
        if len(self.t_host) >= 2:
            for obs in hooks.observers():
                spec = obs.sample_spec(func)
                if spec is not None:
                    times, weight = spec.host_times(self.t_host[0], self.t_host[-1])
                    self.requests.append(_Request(obs, times, weight))
        # segment i (from t[i] back to t[i-1]): inner times, and (request, j, where) for its samples
        self.inner: Dict[int, List[float]] = {}
        self.plan: Dict[int, List[Tuple[int, int, object]]] = {}
        for r, req in enumerate(self.requests):
            for j, tj in enumerate(req.times):
                self._assign(r, j, tj)
        for i, times in self.inner.items():
            self.inner[i] = sorted(set(times), reverse=self.t_host[i] > self.t_host[i - 1])

    def __bool__(self) -> bool:
        return bool(self.requests)

    def _assign(self, r: int, j: int, tj: float) -> None:
        sign = 1.0 if self.t_host[-1] > self.t_host[0] else -1.0
        u = [sign * x for x in self.t_host]
        pos = bisect.bisect_left(u, sign * tj)
        last = len(u) - 1
        for m in (pos - 1, pos):
            if 0 <= m <= last and math.isclose(u[m], sign * tj, rel_tol=1e-9, abs_tol=1e-12):
                segment, where = (last, "start") if m == last else (m + 1, "end")
                self.plan.setdefault(segment, []).append((r, j, where))
                return
        segment = min(max(pos, 1), last)
        self.inner.setdefault(segment, []).append(tj)
        self.plan.setdefault(segment, []).append((r, j, tj))

    def grid(self, i: int, t: Tensor) -> Tuple[Tensor, bool]:
        """The output times of segment ``i``'s backward solve, and whether it has inner times."""
        ends = t[i - 1:i + 1].flip(0)
        inner = self.inner.get(i)
        if not inner:
            return ends, False
        mid = torch.tensor(inner, dtype=t.dtype, device=t.device)
        return torch.cat([ends[:1], mid, ends[1:]]), True

    def record(self, i: int, sol: Tensor, start: Tuple[Tensor, Tensor], end_state: Tensor, n: int) -> None:
        """Keep segment ``i``'s samples: ``sol`` the solution on :meth:`grid`, ``start`` ``(z, a)`` at
        ``t[i]`` (used only for the last output time), ``end_state`` the forward ``z(t[i-1])``."""
        if i not in self.plan:
            return
        inner = self.inner.get(i, [])
        rows = sol[1:1 + len(inner), :2 * n].clone() if inner else None
        position = {tj: k for k, tj in enumerate(inner)}
        for r, j, where in self.plan[i]:
            if where == "start":
                value = start
            elif where == "end":
                value = (end_state, sol[-1, n:2 * n].clone())
            else:
                row = rows[position[where]]
                value = (row[:n], row[n:])
            self.requests[r].got[j] = value

    def deliver(self, func: Callable, unflatten: Callable, dtype: torch.dtype, device: torch.device) -> None:
        """Hand every observer its :class:`hooks.SampleBatch` (field evaluations in phase SAMPLE)."""
        for req in self.requests:
            count = len(req.times)
            if len(req.got) != count:
                raise RuntimeError("internal error: some sample times were not reached")
            states = torch.stack([req.got[j][0] for j in range(count)])
            adjoints = torch.stack([req.got[j][1] for j in range(count)])
            lead = (count,)
            batch = hooks.SampleBatch(
                times=torch.tensor(req.times, dtype=dtype, device=device),
                states=unflatten(states, lead), adjoints=unflatten(adjoints, lead), weight=req.weight,
                weights=torch.full((count,), req.weight, dtype=dtype, device=device))
            with torch.enable_grad(), hooks.phase(hooks.SAMPLE):
                req.observer.on_samples(func, batch)

"""The sampling evaluations: the field once more at each sample time, each layer call paired with
its own output gradient (DESIGN.md §2.3).

A layer's forward hook hands each call to :meth:`Sampler.record`, which keeps the input rows right
away and lets the field continue with a *copy* of the output: an in-place operation after the
layer (``nn.ELU(inplace=True)``) then changes the copy, never the recorded output whose gradient
is taken.  Calls whose rows serve the whole batch get per-sample output gradients from one batched
vector-Jacobian product (:mod:`.batching`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..layers import Conv2dKind, LayerKind
from .batching import backward_pass_id, chunk_size, per_sample_cotangents, solve_batch_size
from .statistics import output_scale, stat_dtype

Sink = Callable[[nn.Module, Tensor, Tensor, int], None]


@dataclass
class Call:
    """One recorded layer call of a sampling evaluation."""

    module: nn.Module
    kind: LayerKind
    rows: Tensor  # (n, L, d_in) input rows, detached
    out: Tensor  # the layer's own output, untouched by later in-place ops
    unbatched_conv: bool


class Sampler:
    """Runs the sampling evaluations of one backward solve and feeds the statistics sinks."""

    def __init__(self, reduction: str, batch_size: Optional[int]):
        self.reduction, self.batch_size = reduction, batch_size
        self.calls: Optional[List[Call]] = None  # not None while a sampling evaluation runs
        self.evaluations = 0

    def record(self, module: nn.Module, kind: LayerKind, x: Tensor, out: Tensor) -> Optional[Tensor]:
        """Keep one call; return the output the field continues with (a copy)."""
        if self.calls is None or not out.requires_grad:
            return None
        rows = kind.input_rows(module, x.detach()).to(stat_dtype(x.dtype))
        unbatched = isinstance(kind, Conv2dKind) and x.dim() == kind.unbatched_dim
        self.calls.append(Call(module, kind, rows, out, unbatched))
        return out.clone()

    def run(self, func, batch, add: Sink, disconnected: Callable[[nn.Module], None]) -> None:
        """All J samples of ``batch`` (a :class:`snopt_dyn.hooks.SampleBatch`)."""
        pass_id = backward_pass_id()
        is_tuple = isinstance(batch.states, tuple)
        weights = getattr(batch, "weights", None)
        for j in range(len(batch.times)):
            state = tuple(s[j] for s in batch.states) if is_tuple else batch.states[j]
            adjoint = tuple(a[j] for a in batch.adjoints) if is_tuple else (batch.adjoints[j],)
            weight = weights[j] if weights is not None else batch.weight
            self._one(func, batch.times[j], state, adjoint, weight, pass_id, add, disconnected)

    def _evaluate(self, func, t: Tensor, state):
        self.calls = []
        try:
            out = func(t, state)
        finally:
            calls, self.calls = self.calls, None
        self.evaluations += 1
        return out, calls

    def _one(self, func, t, state, adjoint, weight, pass_id, add: Sink, disconnected) -> None:
        out, calls = self._evaluate(func, t, state)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs = [(o, a) for o, a in zip(outs, adjoint) if isinstance(o, Tensor) and o.requires_grad]
        parts = state if isinstance(state, tuple) else (state,)
        n = self.batch_size or solve_batch_size(parts, any(c.unbatched_conv for c in calls))
        if not pairs:
            for c in calls:
                disconnected(c.module)
            return
        targets, cotangents = [o for o, _ in pairs], [a for _, a in pairs]
        scale = output_scale(self.reduction, n, weight)
        own = [c for c in calls if n == 1 or c.rows.shape[0] == n]
        shared = [c for c in calls if not (n == 1 or c.rows.shape[0] == n)]
        if own:
            grads = torch.autograd.grad(targets, [c.out for c in own], cotangents, allow_unused=True,
                                        retain_graph=bool(shared))
            for c, g in zip(own, grads):
                if g is None:
                    disconnected(c.module)
                    continue
                x, gr = c.rows, c.kind.output_rows(c.module, g).to(c.rows.dtype) * scale
                if n == 1 and x.shape[0] != 1:
                    x, gr = x.reshape(1, -1, x.shape[-1]), gr.reshape(1, -1, gr.shape[-1])
                add(c.module, x, gr, pass_id)
        if shared:
            grads = per_sample_grads(targets, cotangents, [c.out for c in shared], n)
            for c, g in zip(shared, grads):
                if g is None:
                    disconnected(c.module)
                    continue
                lead = c.kind.batched(c.out)
                flat = g.reshape((n * lead.shape[0],) + tuple(lead.shape[1:]))
                gr = c.kind.output_rows(c.module, flat)
                gr = gr.reshape(n, -1, gr.shape[-1])
                add(c.module, c.rows.reshape(1, -1, c.rows.shape[-1]), gr.to(c.rows.dtype) * scale, pass_id)


def per_sample_grads(targets: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor],
                     n: int) -> List[Optional[Tensor]]:
    """``(n,) + input.shape`` gradients of ``Σ cotangentᵀ target`` w.r.t. each input, one sample's
    cotangent at a time (batched vector-Jacobian products, in chunks)."""
    step = chunk_size(cotangents)
    pieces: List[List[Tensor]] = [[] for _ in inputs]
    for start in range(0, n, step):
        count = min(step, n - start)
        cots = [per_sample_cotangents(a, n, start, count) for a in cotangents]
        grads = _batched_vjp(targets, inputs, cots, count)
        for piece, g in zip(pieces, grads):
            if g is not None:
                piece.append(g)
    return [torch.cat(p) if p else None for p in pieces]


def _batched_vjp(targets, inputs, cots, count: int):
    """One vmapped backward pass; a field with an op vmap cannot batch gets one pass per sample
    (the same numbers, slower)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return torch.autograd.grad(targets, inputs, cots, retain_graph=True, allow_unused=True,
                                       is_grads_batched=True)
    except RuntimeError:
        rows = [torch.autograd.grad(targets, inputs, [c[i] for c in cots], retain_graph=True,
                                    allow_unused=True) for i in range(count)]
        return [None if rows[0][k] is None else torch.stack([r[k] for r in rows]) for k in range(len(inputs))]

"""The sampling evaluations: the field once more at each sample time, each layer call paired with
its own output gradient (docs/ARCHITECTURE.md, step 5).

A layer's forward hook hands each call to :meth:`Sampler.record`, which keeps the input rows right
away and lets the field continue with a *copy* of the output: an in-place operation after the
layer (``nn.ELU(inplace=True)``) then changes the copy, never the recorded output whose gradient
is taken.  Calls whose rows serve the whole batch get per-sample output gradients from one batched
vector-Jacobian product (:mod:`.batching`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers import Conv2dKind, LayerKind
from .batching import backward_pass_id, chunk_size, per_sample_cotangents, solve_batch_size
from .statistics import output_scale, stat_dtype

Sink = Callable[[nn.Module, Tensor, Tensor, int, int], None]  # module, x rows, g rows, pass, evaluation


@dataclass
class Use:
    """One use of a layer in a sampling evaluation: its forward call, or (``autograd_uses``) a
    vector-Jacobian product through it made by the field's own autograd call, where ``W`` acts as
    ``Wᵀ`` on the output cotangent ``δy`` (CNF trace estimators, energy-based fields)."""

    module: nn.Module
    kind: LayerKind
    rows: Tensor  # the side known at once: forward: (n, L, d_in) input rows; backward: δy rows
    target: Tensor  # differentiated later: forward: the output; backward: δx = Wᵀ δy
    forward: bool
    unbatched_conv: bool = False

    def pair(self, grad: Tensor, scale) -> Tuple[Tensor, Tensor]:
        """``(x rows, g rows)`` of this use from the gradient w.r.t. :attr:`target` (``(m, ...)``
        with ``m`` samples); the loss-dependent side carries ``scale``."""
        dtype = self.rows.dtype
        if self.forward:
            g = self.kind.output_rows(self.module, grad).to(dtype) * scale
            return self.rows, g
        x = self.kind.input_rows(self.module, grad).to(dtype)
        if self.module.bias is not None:  # the bias does not enter Wᵀ δy
            x = torch.cat([x[..., :-1], torch.zeros_like(x[..., -1:])], dim=-1)
        return x * scale, self.rows


class Sampler:
    """Runs the sampling evaluations of one backward solve and feeds the statistics sinks."""

    def __init__(self, reduction: str, batch_size: Optional[int], autograd_uses: bool = False):
        self.reduction, self.batch_size, self.autograd_uses = reduction, batch_size, autograd_uses
        self.calls: Optional[List[Use]] = None  # not None while a sampling evaluation runs
        self._pending: Dict[nn.Module, List[Tensor]] = {}
        self.evaluations = 0

    def record(self, module: nn.Module, kind: LayerKind, x: Tensor, out: Tensor) -> Optional[Tensor]:
        """Keep one forward call; return the output the field continues with (a copy)."""
        if self.calls is None or not out.requires_grad:
            return None
        rows = kind.input_rows(module, x.detach()).to(stat_dtype(x.dtype))
        unbatched = isinstance(kind, Conv2dKind) and x.dim() == kind.unbatched_dim
        self.calls.append(Use(module, kind, rows, out, True, unbatched))
        copy = out.clone()
        if self.autograd_uses:
            copy.register_hook(lambda g, m=module: self._output_cotangent(m, g))
        return copy

    def tap_input(self, module: nn.Module, kind: LayerKind, x: Tensor) -> Optional[Tensor]:
        """(``autograd_uses``) A view of the input whose gradient is this layer's ``Wᵀ δy`` alone."""
        if self.calls is None or not self.autograd_uses or not x.requires_grad:
            return None
        view = x.view_as(x)
        view.register_hook(lambda g, m=module, k=kind: self._input_cotangent(m, k, g))
        return view

    def _output_cotangent(self, module: nn.Module, g: Tensor) -> None:
        if self.calls is not None:  # only inside the field's own autograd calls
            self._pending.setdefault(module, []).append(g.detach())

    def _input_cotangent(self, module: nn.Module, kind: LayerKind, g: Tensor) -> Optional[Tensor]:
        pending = self._pending.get(module)
        if self.calls is None or not pending or not g.requires_grad:
            return None
        dy = pending.pop()
        dx = g.clone()
        self.calls.append(Use(module, kind, kind.output_rows(module, dy).to(stat_dtype(dy.dtype)), dx, False))
        return dx

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
            self._pending.clear()
        self.evaluations += 1
        return out, calls

    def _one(self, func, t, state, adjoint, weight, pass_id, add: Sink, disconnected) -> None:
        out, uses = self._evaluate(func, t, state)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs = [(o, a) for o, a in zip(outs, adjoint) if isinstance(o, Tensor) and o.requires_grad]
        parts = state if isinstance(state, tuple) else (state,)
        n = self.batch_size or solve_batch_size(parts, any(u.unbatched_conv for u in uses))
        if not pairs:
            for u in uses:
                disconnected(u.module)
            return
        targets, cotangents = [o for o, _ in pairs], [a for _, a in pairs]
        self.pair(uses, targets, cotangents, n, output_scale(self.reduction, n, weight), pass_id, add, disconnected)

    def pair(self, uses: List[Use], targets: Sequence[Tensor], cotangents: Sequence[Tensor], n: int, scale,
             pass_id: int, add: Sink, disconnected: Callable[[nn.Module], None]) -> None:
        """Pair every use of one sampling evaluation with its own output gradient: the gradient of
        ``Σ cotangentᵀ target`` w.r.t. the use's output, times ``scale`` (the per-sample rescaling and
        quadrature weight of :func:`.statistics.output_scale`); ``n`` is the solve's batch size."""
        own = [u for u in uses if n == 1 or u.kind.batched(u.target).shape[0] == n]
        shared = [u for u in uses if not (n == 1 or u.kind.batched(u.target).shape[0] == n)]
        if own:
            grads = torch.autograd.grad(targets, [u.target for u in own], cotangents, allow_unused=True,
                                        retain_graph=bool(shared))
            for u, g in zip(own, grads):
                if g is None:
                    disconnected(u.module) if u.forward else None
                    continue
                x, gr = u.pair(g, scale)
                if x.shape[0] != gr.shape[0] or (n == 1 and x.shape[0] != 1):
                    x, gr = x.reshape(1, -1, x.shape[-1]), gr.reshape(1, -1, gr.shape[-1])
                add(u.module, x, gr, pass_id, self.evaluations)
        if shared:
            grads = per_sample_grads(targets, cotangents, [u.target for u in shared], n)
            for u, g in zip(shared, grads):
                if g is None:
                    disconnected(u.module) if u.forward else None
                    continue
                lead = u.kind.batched(u.target)
                x, gr = u.pair(g.reshape((n * lead.shape[0],) + tuple(lead.shape[1:])), scale)
                per_sample, fixed = (1, n) if u.forward else (n, 1)  # the fixed side serves all samples
                add(u.module, x.reshape(per_sample, -1, x.shape[-1]), gr.reshape(fixed, -1, gr.shape[-1]),
                    pass_id, self.evaluations)


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

"""Which rows belong to which sample: the batch size of a solve, and per-sample cotangents.

**How the batch size of a solve is found** (override it with ``SNOpt(batch_size=...)``):
every part of the state (a tensor, or each tensor of a tuple state) of dimension >= 2 is batched
along its leading dimension; parts of dimension 0 or 1 (``(d,)`` vectors, scalar accumulators) are
unbatched.  The batch size ``N`` is the largest leading dimension among the batched parts (so the
order of tuple parts does not matter, and a small accumulator beside ``(N, d)`` does not count),
or 1 when no part is batched.  A convolution of the field that torch runs unbatched (a ``(C, H, W)``
input of ``nn.Conv2d``, ``(C, L)`` of ``nn.Conv1d``) makes the solve a batch of one.

A layer call whose input has the batch as leading dimension gives per-sample rows directly.  A call
with another leading dimension (a broadcast ``(1, k)`` time row, a hypernetwork) computes rows that
serve every sample; its per-sample output gradients come from one batched vector-Jacobian product
with the adjoint restricted to one sample at a time (:func:`per_sample_cotangents`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor


def part_batch(part: Tensor) -> int:
    """The batch size of one state part: its leading dimension when it has >= 2 dimensions."""
    return part.shape[0] if part.dim() >= 2 else 1


def solve_batch_size(parts: Sequence[Tensor], unbatched_conv: bool = False) -> int:
    """The batch size of a solve from its state parts (see the module notes)."""
    if unbatched_conv:
        return 1
    return max([part_batch(p) for p in parts] + [1])


def backward_pass_id() -> int:
    """An id of the ``backward()`` call running now (-1 outside one).

    Distinct backward passes of one iteration are gradient-accumulation micro-batches; torch numbers
    its graph tasks.  Without that (private) counter every pass counts as the same one.
    """
    current = getattr(torch._C, "_current_graph_task_id", None)
    return int(current()) if current is not None else 0


def per_sample_cotangents(adjoint: Tensor, n: int, start: int, count: int) -> Tensor:
    """``(count,) + adjoint.shape``: entry ``i`` is the adjoint of sample ``start + i`` alone.

    A batched part keeps only that sample's row; an unbatched part (no batch dimension) cannot be
    attributed to one sample and is shared equally (``adjoint / n``).
    """
    if part_batch(adjoint) == n and adjoint.dim() >= 2:
        out = adjoint.new_zeros((count,) + tuple(adjoint.shape))
        idx = torch.arange(count, device=adjoint.device)
        out[idx, start + idx] = adjoint[start:start + count]
        return out
    return (adjoint / n).unsqueeze(0).expand((count,) + tuple(adjoint.shape))


def chunk_size(parts: Iterable[Tensor], budget: int = 1 << 22) -> int:
    """Samples per batched vector-Jacobian product, so that the cotangents stay under ``budget``
    elements (4M: 32 MB in float64)."""
    numel = sum(p.numel() for p in parts) or 1
    return max(1, budget // numel)

"""Averaging statistics over ``torch.distributed`` ranks: one collective for all layers.

Every rank flattens its per-layer numbers into one buffer in the same (registration) order, with
zeros for layers it has no statistics for, and the buffer is all-reduced once.  Averages are
weighted by the samples each rank saw, so ``DistributedDataParallel`` on R ranks equals one process
on the whole batch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .statistics import Factors


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(buffer: Tensor) -> Tensor:
    import torch.distributed as dist
    dist.all_reduce(buffer)
    return buffer


def average_factors(entries: Sequence[Optional[Factors]], shapes: Sequence[Tuple[int, int]],
                    device: torch.device) -> List[Optional[Factors]]:
    """Sample-weighted averages of ``A``, ``G``, ``mult`` and the summed batch, over ranks.

    ``shapes[i]`` is ``(d_in, d_out)`` of layer ``i`` (known on every rank even without data).
    Per-sample gradients stay local (their moments are reduced by :func:`sum_moments`).
    """
    parts = []
    for entry, (d_in, d_out) in zip(entries, shapes):
        if entry is None:
            parts.append(torch.zeros(3 + d_in * d_in + d_out * d_out, dtype=torch.float64, device=device))
            continue
        s = float(entry.samples)
        head = torch.tensor([s, s * entry.mult, entry.batch], dtype=torch.float64, device=device)
        parts += [torch.cat([head, (s * entry.a).reshape(-1).to(device, torch.float64),
                             (s * entry.g).reshape(-1).to(device, torch.float64)])]
    flat = _all_reduce(torch.cat(parts))
    sizes = [3 + d_in * d_in + d_out * d_out for d_in, d_out in shapes]
    heads = torch.stack([chunk[:3] for chunk in flat.split(sizes)]).tolist()  # one sync per refresh
    out: List[Optional[Factors]] = []
    for chunk, (samples, s_mult, batch), entry, (d_in, d_out) in zip(flat.split(sizes), heads, entries, shapes):
        if samples <= 0:
            out.append(None)
            continue
        dtype = entry.a.dtype if entry is not None else torch.float32
        a = (chunk[3:3 + d_in * d_in] / samples).reshape(d_in, d_in).to(dtype)
        g = (chunk[3 + d_in * d_in:] / samples).reshape(d_out, d_out).to(dtype)
        out.append(Factors(a=a, g=g, mult=s_mult / samples, batch=batch, samples=int(samples),
                           per_sample=entry.per_sample if entry is not None else []))
    return out


def sum_moments(sums: Sequence[Tuple[Tensor, int]]) -> List[Tuple[Tensor, Tensor]]:
    """All-reduce ``(Σ_b proj², count)`` of every layer in one collective (counts stay tensors:
    no host sync)."""
    device = sums[0][0].device
    flat = _all_reduce(torch.cat([torch.cat([torch.tensor([float(c)], dtype=torch.float64, device=device),
                                             t.reshape(-1).to(torch.float64)]) for t, c in sums]))
    out, offset = [], 0
    for t, _ in sums:
        n = t.numel()
        out.append((flat[offset + 1:offset + 1 + n].reshape(t.shape).to(t.dtype), flat[offset]))
        offset += 1 + n
    return out

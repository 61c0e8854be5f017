"""The shape of a solve's state, and the error norms torchdiffeq uses on it.

The engine integrates one flat 1-D state.  :class:`Structure` maps a tensor or a tuple of tensors
(any of them 0-dim) onto it and back, and builds the error norms of torchdiffeq: the RMS of each
part and the maximum over parts, for the state and for the augmented backward state
``[z, a, mu, tau]`` (every parameter's adjoint is its own part; the seminorm drops them).  One RMS
over the concatenation would be looser: a small part (a CNF's ``logp``) would hardly count.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

State = Union[Tensor, Tuple[Tensor, ...]]
Norm = Callable[[Tensor], Tensor]


def parts_rms_max(flat: Tensor, sizes: Sequence[int]) -> Tensor:
    """``max_k rms(part_k)`` of a flat tensor cut into ``sizes``; no host synchronisation."""
    if len(sizes) == 1:
        return flat.pow(2).mean().sqrt()
    means = [p.pow(2).mean() for p in flat.split(list(sizes)) if p.numel()]
    return torch.stack(means).max().sqrt()


class Structure:
    """Flattens a tensor or a tuple of tensors into one 1-D state and back."""

    def __init__(self, y0: State):
        self.is_tuple = isinstance(y0, (tuple, list))
        parts = tuple(y0) if self.is_tuple else (y0,)
        self.shapes: List[torch.Size] = [p.shape for p in parts]
        self.sizes: List[int] = [p.numel() for p in parts]
        self.numel = sum(self.sizes)

    def flatten(self, y: State) -> Tensor:
        if not self.is_tuple:
            return y.reshape(-1)
        return torch.cat([p.reshape(-1) for p in y])

    def unflatten(self, flat: Tensor, lead: Tuple[int, ...] = ()) -> State:
        """``flat`` has shape ``lead + (numel,)``; returns parts of shape ``lead + shape``."""
        lead = tuple(lead)
        if not self.is_tuple:
            return flat.reshape(lead + tuple(self.shapes[0]))
        parts = torch.split(flat, self.sizes, dim=-1)
        return tuple(p.reshape(lead + tuple(s)) for p, s in zip(parts, self.shapes))

    def parts(self, flat: Tensor) -> Tuple[Tensor, ...]:
        """The state's parts as a tuple (one element for a tensor state)."""
        out = self.unflatten(flat)
        return out if self.is_tuple else (out,)

    def state_norm(self, user_norm: Optional[Callable] = None) -> Norm:
        """torchdiffeq's forward norm on the flat state: a user ``options["norm"]`` gets the state's own
        structure (a tuple for tuple states); the default is RMS, per part for tuples."""
        if user_norm is not None:
            return lambda e: user_norm(self.unflatten(e))
        return lambda e: parts_rms_max(e, self.sizes)


def adjoint_norm(structure: Structure, param_shapes: Sequence[torch.Size], state_norm: Norm,
                 seminorm: bool, user_norm: Optional[Callable] = None) -> Norm:
    """The backward error norm on ``[z, a, mu, tau]`` (flat; ``tau`` the time adjoint, one entry).

    As torchdiffeq: ``max(|tau|, norm(z), norm(a), max_p rms(mu_p))``; the seminorm drops ``mu``.
    A user norm receives ``(tau, *z_parts, *a_parts, *mu_parts)`` (``(tau, z, a, *mu)`` for a tensor
    state), each part in its own shape, as torchdiffeq's ``adjoint_options["norm"]`` does.
    """
    n = structure.numel
    param_sizes = [int(torch.Size(s).numel()) for s in param_shapes]
    num_params = sum(param_sizes)
    if user_norm is not None:
        def custom(e: Tensor) -> Tensor:
            mu = e[2 * n:2 * n + num_params].split(param_sizes)
            mu = [m.reshape(s) for m, s in zip(mu, param_shapes)]
            return user_norm((e[-1].reshape(()), *structure.parts(e[:n]), *structure.parts(e[n:2 * n]), *mu))
        return custom

    def default(e: Tensor) -> Tensor:
        terms = [e[-1].abs(), state_norm(e[:n]), state_norm(e[n:2 * n])]
        if not seminorm and num_params:
            terms.append(parts_rms_max(e[2 * n:2 * n + num_params], param_sizes))
        return torch.stack(terms).max()
    return default

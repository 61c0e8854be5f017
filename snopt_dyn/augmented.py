"""The backward ODE of the adjoint method on the flat augmented state ``[z, a, mu, tau]``.

``z`` is the state integrated back, ``a = dL/dz`` the adjoint, ``mu`` the accumulated parameter
gradient and ``tau`` the accumulated time adjoint ``-int a . df/dt``.  ``tau`` is not used for the
time gradients (those are exact from ``a . f`` at the output times); it is carried, as torchdiffeq
carries it, so that the backward error control of a time-dependent field is the same as native.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


class AugmentedDynamics:
    """``d/ds [z, a, mu, tau] = [f, -a^T df/dz, -a^T df/dtheta, -a^T df/ds]``.

    A field that depends on neither ``z``, ``t`` nor a parameter (``dz/dt = cos(t)`` with a
    constant ``t``) returns an output without a graph; its vector-Jacobian products are zero.
    The user's ``callback_*_adjoint(t0, (tau, z, a, *mu), dt)`` become this object's solver
    callbacks, in torchdiffeq's argument layout.
    """

    def __init__(self, field: Callable, params: Tuple[Tensor, ...], n: int, unflatten: Callable,
                 user_func: object):
        self.field, self.params, self.n = field, params, n
        self.unflatten = unflatten
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        for name in CALLBACKS:
            callback = getattr(user_func, name + "_adjoint", None)
            if callback is not None:
                setattr(self, name, self._wrap_callback(callback))

    def _wrap_callback(self, callback: Callable) -> Callable:
        def call(t0, aug, dt):
            return callback(t0, self.split_view(aug), dt)
        return call

    def split_view(self, aug: Tensor) -> tuple:
        """``(tau, z, a, *mu)`` as torchdiffeq lays out its augmented state."""
        n = self.n
        mu = aug[2 * n:2 * n + sum(self.sizes)].split(self.sizes)
        return (aug[-1].reshape(()), self.unflatten(aug[:n]), self.unflatten(aug[n:2 * n]),
                *(m.reshape(s) for m, s in zip(mu, self.shapes)))

    def initial(self, z: Tensor, a: Tensor) -> Tensor:
        return torch.cat([z, a, z.new_zeros(sum(self.sizes) + 1)])

    def __call__(self, s: Tensor, aug: Tensor) -> Tensor:
        n, dtype = self.n, aug.dtype
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            z = aug[:n].detach().requires_grad_(True)
            f = self.field(s, z)
            inputs = (z, s) + self.params
            if f.requires_grad:
                # retain_graph, as torchdiffeq: a field may read a tensor with a history (a context
                # ``self.ctx = self.encoder(x)``) that every evaluation differentiates through again
                vjps = torch.autograd.grad(f, inputs, -aug[n:2 * n], allow_unused=True, retain_graph=True)
            else:
                vjps = (None,) * len(inputs)
        out = [f.detach().to(dtype)]
        out += [(v.reshape(-1).to(dtype) if v is not None else torch.zeros(x.numel(), dtype=dtype, device=aug.device))
                for v, x in zip(vjps[:1] + vjps[2:], (z,) + self.params)]
        out.append(vjps[1].reshape(1).to(dtype) if vjps[1] is not None else aug.new_zeros(1))
        return torch.cat(out)

    def split(self, aug: Tensor, params: Sequence[Tensor]) -> Tuple[Tensor, list]:
        """The adjoint ``a`` and the parameter gradients (in the parameters' shapes and dtypes)."""
        n = self.n
        grads, offset = [], 2 * n
        for p in params:
            grads.append(aug[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return aug[n:2 * n], grads

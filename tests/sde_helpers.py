"""Helpers shared by the SDE tests (not a test module)."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

try:
    import torchsde
except ImportError:  # the tests that need it skip themselves (pytest.importorskip)
    torchsde = None

#: the names of the engine's autograd nodes: the SDE adjoint (:mod:`snopt_dyn.sde_adjoint`) and the
#: ODE adjoint (:mod:`snopt_dyn.adjoint`)
SDE_ENGINE_NODE = "_SDEAdjointSolveBackward"
ODE_ENGINE_NODE = "_AdjointSolveBackward"


def engine_nodes(loss: torch.Tensor) -> Counter:
    """How many engine solves (SDE and ODE, by autograd node name) are in ``loss``'s graph."""
    found: Counter = Counter()
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in (SDE_ENGINE_NODE, ODE_ENGINE_NODE):
            found[name] += 1
        stack.extend(n for n, _ in node.next_functions)
    return found


def engine_used(loss: torch.Tensor) -> bool:
    """Whether the engine's SDE solve is in ``loss``'s graph."""
    return engine_nodes(loss)[SDE_ENGINE_NODE] > 0


# ------------------------------------------------------------------------------ a latent SDE
#: sizes of :class:`LatentSDE`; ``TS`` is 0.25 apart, on the ``DT = 1/16`` grid exactly
LATENT, CONTEXT, DATA, HIDDEN = 3, 4, 2, 8
TS = torch.linspace(0, 1, 5, dtype=torch.float64)
DT = 1 / 16


class LatentSDE(nn.Module):
    """torchsde's latent-SDE example in miniature: a GRU context read by the posterior drift ``f``
    (looked up by time in ``self._ctx``, set before the solve), a prior drift ``h``, a diagonal
    diffusion of per-channel networks, ``logqp=True``, the negative ELBO as the loss.

    ``forward(adjoint=True)`` calls ``torchsde.sdeint_adjoint`` with the context in ``adjoint_params``;
    ``adjoint=False`` calls plain ``torchsde.sdeint``.  Other keywords go to the solver."""

    noise_type = "diagonal"

    def __init__(self, sde_type="ito"):
        super().__init__()
        self.sde_type = sde_type
        self.encoder = nn.GRU(DATA, CONTEXT)
        self.qz0_net = nn.Linear(CONTEXT, 2 * LATENT)
        self.f_net = nn.Sequential(nn.Linear(LATENT + CONTEXT, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, LATENT))
        self.h_net = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, LATENT))
        self.g_nets = nn.ModuleList([nn.Sequential(nn.Linear(1, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 1),
                                                   nn.Sigmoid()) for _ in range(LATENT)])
        self.projector = nn.Linear(LATENT, DATA)
        self._ctx = None

    def f(self, t, y):
        ts, ctx = self._ctx
        i = min(int(torch.searchsorted(ts, t, right=True)), len(ts) - 1)
        return self.f_net(torch.cat((y, ctx[i]), dim=1))

    def h(self, t, y):
        return self.h_net(y)

    def g(self, t, y):
        return torch.cat([net(y_i) for net, y_i in zip(self.g_nets, torch.split(y, 1, dim=1))], dim=1)

    def forward(self, xs, eps, bm, adjoint=True, method="euler", **kwargs):
        ctx = torch.flip(self.encoder(torch.flip(xs, dims=(0,)))[0], dims=(0,))
        self._ctx = (TS, ctx)
        mean, logstd = self.qz0_net(ctx[0]).chunk(2, dim=1)
        z0 = mean + logstd.exp() * eps
        if adjoint:
            params = (ctx,) + tuple(self.f_net.parameters()) + tuple(self.g_nets.parameters()) + \
                tuple(self.h_net.parameters())
            zs, log_ratio = torchsde.sdeint_adjoint(self, z0, TS, bm=bm, dt=DT, logqp=True, method=method,
                                                    adjoint_params=params, **kwargs)
        else:
            zs, log_ratio = torchsde.sdeint(self, z0, TS, bm=bm, dt=DT, logqp=True, method=method, **kwargs)
        log_pxs = torch.distributions.Normal(self.projector(zs), 0.1).log_prob(xs).sum(dim=(0, 2)).mean()
        return -log_pxs + log_ratio.sum(dim=0).mean() + 0.5 * (mean ** 2).sum(dim=1).mean()


def latent_data(batch: int, seed: int = 0):
    """Observations ``xs`` ``(len(TS), batch, DATA)`` and the initial noise ``eps`` ``(batch, LATENT)``."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(len(TS), batch, DATA, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, LATENT, generator=g, dtype=torch.float64)
    return xs, eps


def latent_bm(batch: int, m: int = LATENT + 1, entropy: int = 11, **kwargs):
    """A fresh Brownian path over ``[0, 1]`` of size ``(batch, m)`` (``m = LATENT + 1`` with ``logqp``)."""
    return torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(batch, m), dtype=torch.float64, entropy=entropy,
                                     **kwargs)

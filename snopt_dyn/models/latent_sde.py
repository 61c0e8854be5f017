"""A reference latent SDE written with plain torchsde calls, the way torchsde's users write it.

In the style of torchsde's ``examples/latent_sde_lorenz.py`` (Li, Wong, Chen & Duvenaud, AISTATS
2020): our own code, the same structure.

* **Encoder:** a GRU reads the observations backwards in time; a Linear layer turns its output at
  every step into a context ``ctx[i]`` that summarises ``x[i:]``.
* **Initial state:** ``q(z0 | x) = N(mean, std)`` from ``ctx[0]``; the prior ``p(z0) = N(m, s)`` has
  trainable ``m`` and ``log s``.
* **The SDE** (this module itself: ``noise_type = "diagonal"``, ``sde_type = "stratonovich"`` by
  default): posterior drift ``f(t, z) = MLP([z, ctx(t)])`` with ``ctx(t)`` the context of the next
  observation after ``t``; prior drift ``h(t, z) = MLP(z)``; diagonal diffusion ``g(t, z)``, one
  small network per latent channel ending in a sigmoid (``g_i`` reads ``z_i`` only, as diagonal noise
  requires).
* **The solve:** ``torchsde.sdeint_adjoint(self, z0, ts, bm=BrownianInterval(...), logqp=True,
  method="reversible_heun", adjoint_method="adjoint_reversible_heun")``.  ``logqp=True`` adds the
  path KL ``½∫|(f − h)/g|² dt`` as an extra state channel.  The context is a plain tensor, so it is
  handed to the adjoint in ``adjoint_params`` (the Lorenz example's way): otherwise neither the encoder
  nor ``ctx`` would get a gradient.
* **Decoder:** a Linear layer from the latent state to the observation space.
* **Loss:** :meth:`LatentSDE.elbo` is the negative ELBO: the Gaussian log-likelihood (fixed
  ``noise_std``) of the observations at the observed times, plus the path KL from ``logqp``, plus
  ``KL(q(z0 | x) || p(z0))``.

torchsde is imported on first use and bound to the module global ``torchsde``, so the model calls
``torchsde.sdeint_adjoint`` exactly as user code does: natively as written, and on snopt-dyn's engine
after ``snopt_dyn.wrap(model)`` (outputs and gradients equal to torchsde's for the same Brownian path).
Reversible Heun needs a Stratonovich SDE; with ``sde_type="ito"`` the default method is ``euler``
(torchsde's default adjoint for it, ``milstein``).  SNOpt leaves Itô diffusion layers unpreconditioned.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..optional import require

__all__ = ["LatentSDE", "import_torchsde"]

torchsde = None


def import_torchsde():
    """torchsde, imported once; a clear error when the optional dependency is missing."""
    global torchsde
    if torchsde is None:
        torchsde = require("torchsde", "the latent SDE", "torchsde")
    return torchsde


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                         nn.Linear(hidden, d_out))


class LatentSDE(nn.Module):
    """Latent SDE VAE for series ``x`` of shape ``(N, L, obs_dim)`` observed at times ``ts`` ``(L,)``.

    Args:
        obs_dim: channels per observation.
        latent_dim, context_dim, hidden: sizes of the latent state, the context and the MLPs
            (the GRU has ``hidden`` units; each diffusion network ``hidden // 2``, at least 4).
        sde_type: ``"stratonovich"`` (default; SNOpt can precondition its diffusion layers) or ``"ito"``.
        method, adjoint_method: torchsde's solver names; default ``reversible_heun`` with
            ``adjoint_reversible_heun`` (exact gradients) for Stratonovich, ``euler`` with torchsde's
            default adjoint for Itô.
        dt: solver step (keep the gaps of ``ts`` integer multiples of it for reversible Heun).
        noise_std: fixed observation noise scale of the Gaussian likelihood.
    """

    noise_type = "diagonal"

    def __init__(self, obs_dim: int, latent_dim: int = 4, context_dim: int = 16, hidden: int = 32,
                 sde_type: str = "stratonovich", method: Optional[str] = None,
                 adjoint_method: Optional[str] = None, dt: float = 0.1, noise_std: float = 0.1):
        super().__init__()
        if sde_type not in ("stratonovich", "ito"):
            raise ValueError(f"sde_type must be 'stratonovich' or 'ito', got {sde_type!r}")
        self.sde_type = sde_type
        self.method = method or ("reversible_heun" if sde_type == "stratonovich" else "euler")
        self.adjoint_method = adjoint_method or (
            "adjoint_reversible_heun" if self.method == "reversible_heun" else None)
        self.latent_dim, self.dt, self.noise_std = latent_dim, dt, noise_std
        self.gru = nn.GRU(obs_dim, hidden, batch_first=True)
        self.context = nn.Linear(hidden, context_dim)
        self.qz0_net = nn.Linear(context_dim, 2 * latent_dim)
        self.pz0_mean = nn.Parameter(torch.zeros(1, latent_dim))
        self.pz0_logstd = nn.Parameter(torch.zeros(1, latent_dim))
        self.f_net = _mlp(latent_dim + context_dim, hidden, latent_dim)
        self.h_net = _mlp(latent_dim, hidden, latent_dim)
        width = max(4, hidden // 2)
        self.g_nets = nn.ModuleList(
            nn.Sequential(nn.Linear(1, width), nn.Softplus(), nn.Linear(width, 1), nn.Sigmoid())
            for _ in range(latent_dim))
        self.decoder = nn.Linear(latent_dim, obs_dim)
        self._ctx: Optional[Tuple[Tensor, Tensor]] = None  # (ts, ctx (L, N, context)) of the latest solve

    # ------------------------------------------------------------------------------ the SDE
    def f(self, t: Tensor, z: Tensor) -> Tensor:
        """Posterior drift: reads the context of the next observation after ``t``."""
        ts, ctx = self._ctx
        i = min(int(torch.searchsorted(ts, t, right=True)), len(ts) - 1)
        return self.f_net(torch.cat([z, ctx[i]], dim=1))

    def h(self, t: Tensor, z: Tensor) -> Tensor:
        """Prior drift."""
        return self.h_net(z)

    def g(self, t: Tensor, z: Tensor) -> Tensor:
        """Diagonal diffusion ``(N, latent)``: ``g_i`` depends on ``z_i`` only."""
        return torch.cat([net(z_i) for net, z_i in zip(self.g_nets, torch.split(z, 1, dim=1))], dim=1)

    # ------------------------------------------------------------------------------ the model
    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(ctx (L, N, context), mean, std)``: the GRU runs backwards, so ``ctx[i]`` summarises ``x[:, i:]``."""
        out, _ = self.gru(x.flip(1))
        ctx = self.context(out.flip(1)).transpose(0, 1)
        mean, logstd = self.qz0_net(ctx[0]).chunk(2, dim=1)
        return ctx, mean, logstd.exp()

    def brownian(self, ts: Tensor, batch: int, entropy: Optional[int] = None, dtype=None, device=None):
        """The Brownian motion of one solve: ``latent + 1`` channels (logqp adds one state channel)."""
        import_torchsde()
        return torchsde.BrownianInterval(t0=float(ts[0]), t1=float(ts[-1]), size=(batch, self.latent_dim + 1),
                                         dtype=dtype or ts.dtype, device=device or ts.device, entropy=entropy)

    def forward(self, x: Tensor, ts: Tensor, bm=None, eps: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Decode one posterior sample.

        Args:
            x: ``(N, L, obs_dim)``; ts: ``(L,)`` strictly increasing, without grad.
            bm: a torchsde Brownian motion of size ``(N, latent + 1)`` (default: a ``BrownianInterval``
                whose entropy is drawn from ``generator``, or the global RNG).
            eps: ``(N, latent)`` standard normal noise of ``z0`` (default: drawn from ``generator``).

        Returns:
            ``(pred_x (N, L, obs_dim), path_kl (N,), z0_kl (N,))``.
        """
        import_torchsde()
        n = x.shape[0]
        ctx, mean, std = self.encode(x)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                              device=generator.device if generator is not None else mean.device).to(mean.device)
        z0 = mean + std * eps
        if bm is None:
            entropy = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
            bm = self.brownian(ts, n, entropy, dtype=x.dtype, device=x.device)
        self._ctx = (ts, ctx)  # read by f, also in the backward pass: kept until the next solve
        params = (ctx,) + tuple(p for net in (self.f_net, self.g_nets, self.h_net) for p in net.parameters()
                                if p.requires_grad)
        zs, log_ratio = torchsde.sdeint_adjoint(self, z0, ts, bm=bm, dt=self.dt, logqp=True, method=self.method,
                                                adjoint_method=self.adjoint_method, adjoint_params=params)
        pred_x = self.decoder(zs).transpose(0, 1)
        pz0 = torch.distributions.Normal(self.pz0_mean, self.pz0_logstd.exp())
        qz0 = torch.distributions.Normal(mean, std)
        z0_kl = torch.distributions.kl_divergence(qz0, pz0).sum(dim=1)
        return pred_x, log_ratio.sum(dim=0), z0_kl

    def elbo(self, x: Tensor, ts: Tensor, mask: Optional[Tensor] = None, bm=None, eps: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """Negative ELBO averaged over the batch (lower is better); ``mask`` ``(N, L)`` drops steps from
        the likelihood."""
        pred_x, path_kl, z0_kl = self(x, ts, bm=bm, eps=eps, generator=generator)
        log_two_pi_var = math.log(2 * math.pi) + 2 * math.log(self.noise_std)
        loglik = -0.5 * (log_two_pi_var + (x - pred_x) ** 2 / self.noise_std ** 2)
        if mask is not None:
            loglik = loglik * mask.unsqueeze(-1).to(loglik)
        return (-loglik.sum((1, 2)) + path_kl + z0_kl).mean()

    @torch.no_grad()
    def reconstruct(self, x: Tensor, ts: Tensor, samples: int = 8,
                    generator: Optional[torch.Generator] = None) -> Tensor:
        """The posterior-mean reconstruction ``(N, L, obs_dim)``: the decoded path averaged over
        ``samples`` posterior draws (``z0`` and Brownian path), all in one solve."""
        n = x.shape[0]
        pred_x, _, _ = self(x.repeat(samples, 1, 1), ts, generator=generator)
        return pred_x.reshape(samples, n, *pred_x.shape[1:]).mean(0)

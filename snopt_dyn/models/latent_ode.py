"""Reference latent-ODE models written with plain torchdiffeq calls (for :func:`snopt_dyn.wrap`).

* :class:`LatentODE`: a VAE over irregularly observed trajectories, in the style of torchdiffeq's
  ``latent_ode`` example (Chen et al. 2018): a GRU reads the observations backwards in time and
  gives the mean and log-variance of the initial latent state ``z0``; a reparameterised sample of
  ``z0`` is integrated with ``torchdiffeq.odeint`` over the observation times; an MLP decodes every
  latent state.  :meth:`LatentODE.elbo` is the negative evidence lower bound (Gaussian likelihood
  with a fixed noise scale plus the KL divergence to a standard normal prior).
* :class:`ODERNN`: the ODE-RNN encoder of Rubanova, Chen & Duvenaud (2019) with a classification
  head: between observations the hidden state follows an ODE (one solve per gap), a ``GRUCell``
  updates it at each observation (only where the mask says the step was observed), and a Linear
  layer maps the final hidden state to class logits.  Input layout: values ``(N, L, C)``, times
  ``(L,)`` or ``(N, L)``, mask ``(N, L)`` -- the layout of
  :class:`snopt_dyn.datasets.TimeSeriesData` (JapaneseVowels, BasicMotions).

Both call torchdiffeq the way user code does -- :class:`LatentODE` through the module attribute
(``torchdiffeq.odeint``), :class:`ODERNN` through imported names (``odeint``, ``odeint_adjoint``) --
so they run natively as written and on the engine adjoint after ``snopt_dyn.wrap(model)``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torchdiffeq
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

__all__ = ["LatentODEFunc", "RecognitionRNN", "LatentODE", "ODERNNField", "ODERNN"]


class LatentODEFunc(nn.Module):
    """Autonomous latent dynamics ``dz/dt = MLP(z)`` (ELU activations)."""

    def __init__(self, latent_dim: int = 4, hidden: int = 20):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, latent_dim))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class RecognitionRNN(nn.Module):
    """GRU run backwards over the observations; returns the mean and log-variance of ``z0``."""

    def __init__(self, obs_dim: int, latent_dim: int = 4, hidden: int = 25):
        super().__init__()
        self.gru = nn.GRU(obs_dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        _, h = self.gru(x.flip(1))            # (1, N, hidden): the state after reading x[:, 0] last
        mean, logvar = self.out(h[-1]).chunk(2, dim=-1)
        return mean, logvar


class LatentODE(nn.Module):
    """Latent ODE VAE for trajectories ``x`` of shape ``(N, L, obs_dim)`` observed at times ``t`` ``(L,)``.

    Args:
        obs_dim: channels per observation.
        latent_dim, rnn_hidden, ode_hidden, dec_hidden: sizes of the latent state and the networks.
        method, rtol, atol: solver settings passed to torchdiffeq.
        adjoint: call ``torchdiffeq.odeint_adjoint`` instead of ``torchdiffeq.odeint``.
        noise_std: fixed observation noise scale of the Gaussian likelihood in :meth:`elbo`.
    """

    def __init__(self, obs_dim: int, latent_dim: int = 4, rnn_hidden: int = 25, ode_hidden: int = 20,
                 dec_hidden: int = 20, method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4,
                 adjoint: bool = False, noise_std: float = 0.1):
        super().__init__()
        self.encoder = RecognitionRNN(obs_dim, latent_dim, rnn_hidden)
        self.func = LatentODEFunc(latent_dim, ode_hidden)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, dec_hidden), nn.ReLU(), nn.Linear(dec_hidden, obs_dim))
        self.method, self.rtol, self.atol = method, rtol, atol
        self.adjoint = adjoint
        self.noise_std = noise_std

    def forward(self, x: Tensor, t: Tensor, sample: Optional[bool] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Reconstruct ``x`` at times ``t``.

        Returns ``(pred_x, mean, logvar)``: ``pred_x`` ``(N, L, obs_dim)`` decoded from ``z0 = mean +
        exp(logvar / 2) * eps`` when sampling (default: in training mode), else from ``z0 = mean``.
        """
        mean, logvar = self.encoder(x)
        if self.training if sample is None else sample:
            eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
            z0 = mean + eps * torch.exp(0.5 * logvar)
        else:
            z0 = mean
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        zs = solve(self.func, z0, t, rtol=self.rtol, atol=self.atol, method=self.method)  # (L, N, latent)
        pred_x = self.decoder(zs).transpose(0, 1)
        return pred_x, mean, logvar

    def elbo(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """Negative ELBO averaged over the batch (lower is better); ``mask`` ``(N, L)`` drops steps."""
        pred_x, mean, logvar = self(x, t, sample=True, generator=generator)
        log_two_pi_var = math.log(2 * math.pi) + 2 * math.log(self.noise_std)
        loglik = -0.5 * (log_two_pi_var + (x - pred_x) ** 2 / self.noise_std ** 2)
        if mask is not None:
            loglik = loglik * mask.unsqueeze(-1).to(loglik)
        kl = 0.5 * (logvar.exp() + mean ** 2 - 1.0 - logvar).sum(-1)
        return (-loglik.sum((1, 2)) + kl).mean()


class ODERNNField(nn.Module):
    """Hidden-state dynamics of the ODE-RNN, integrated on ``s`` in ``[0, 1]`` for each gap.

    ``dh/ds = Δt · MLP(h)`` with ``Δt`` ``(N, 1)`` the length of the current gap of every series, so
    one solve covers series observed at different times (a zero gap leaves ``h`` unchanged).  The gap
    travels in the state as ``(h, Δt)`` with ``dΔt/ds = 0``: an attribute set per solve would be read
    again, changed, when the adjoint's backward pass runs.
    """

    def __init__(self, hidden: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, hidden))

    def forward(self, t: Tensor, state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        h, dt = state
        return self.net(h) * dt, torch.zeros_like(dt)


class ODERNN(nn.Module):
    """ODE-RNN classifier for irregular multivariate series (Rubanova et al. 2019).

    Args:
        input_channels: ``C``.
        hidden: size of the hidden state.
        num_classes: logits produced by the head.
        width: hidden width of the ODE's MLP.
        method, rtol, atol: solver settings passed to torchdiffeq.
        adjoint: solve with ``odeint_adjoint`` (default) or ``odeint``.
    """

    def __init__(self, input_channels: int, hidden: int, num_classes: int, width: int = 32,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4, adjoint: bool = True):
        super().__init__()
        self.func = ODERNNField(hidden, width)
        self.cell = nn.GRUCell(input_channels, hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.hidden = hidden
        self.method, self.rtol, self.atol = method, rtol, atol
        self.adjoint = adjoint

    def encode(self, values: Tensor, times: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Final hidden state ``(N, hidden)``; ``NaN`` values count as unobserved channels (zeros)."""
        if values.dim() != 3:
            raise ValueError(f"values must have shape (N, L, C), got {tuple(values.shape)}")
        n, length, _ = values.shape
        if times.dim() == 1:
            times = times.unsqueeze(0).expand(n, length)
        if times.shape != (n, length):
            raise ValueError(f"times must have shape (L,) or (N, L) = {(n, length)}, got {tuple(times.shape)}")
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.bool, device=values.device)
        values = torch.nan_to_num(values)
        keep = mask.to(torch.bool).unsqueeze(-1)
        solve = odeint_adjoint if self.adjoint else odeint
        span = torch.tensor([0.0, 1.0], dtype=values.dtype, device=values.device)
        h = values.new_zeros(n, self.hidden)
        for i in range(length):
            if i > 0:
                gap = (times[:, i] - times[:, i - 1]).to(values.dtype).unsqueeze(-1)
                if bool((gap != 0).any()):
                    hs, _ = solve(self.func, (h, gap), span, rtol=self.rtol, atol=self.atol, method=self.method)
                    h = hs[-1]
            h = torch.where(keep[:, i], self.cell(values[:, i], h), h)
        return h

    def forward(self, values: Tensor, times: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.encode(values, times, mask))

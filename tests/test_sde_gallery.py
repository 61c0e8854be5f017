"""A gallery of torchsde models written the way torchsde's users write them, given to ``snopt_dyn.wrap``.

* the latent-SDE example: posterior drift ``f`` reading a GRU context, prior drift ``h``, a diagonal
  diffusion of per-channel networks, ``logqp=True``, Itô, torchsde's default method (``srk``), the
  context passed to ``sdeint_adjoint`` in ``adjoint_params``, the negative ELBO as the loss;
* a latent model of stochastic Lorenz data with a time-dependent context looked up inside ``f``
  (``self._ctx``, set before the solve), additive noise, Stratonovich, ``midpoint``,
  ``adjoint_params=(ctx,) + params``;
* an SDE-GAN: a generator that is a Stratonovich SDE with general noise (``f_and_g``) solved by reversible
  Heun (``sdeint_adjoint`` with ``adjoint_reversible_heun``, or plain ``sdeint``), and a Neural CDE
  discriminator over the generated path (``torchcde.cdeint(backend="torchsde", method="reversible_heun")``);
  the loss is the discriminator's score.

For each: (1) the engine runs every solve; (2) outputs and every parameter gradient equal the same
model's native run (inside ``snopt_dyn.no_interception()``) on the same Brownian path (a fresh
``BrownianInterval`` with the same entropy per run): bit for bit for ``sdeint_adjoint``, to 1e-8
relative for plain ``sdeint`` (the engine's reversible Heun adjoint against back-propagation);
(3) one SNOpt refresh iteration says nothing about layers run by another library's solver, and every
drift and diffusion ``Linear`` gets its role (``"ode"``; Itô diffusion layers ``"ito-diffusion"``,
left raw and said once).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

torchsde = pytest.importorskip("torchsde")
try:
    import torchcde
except ImportError:  # the SDE-GAN's discriminator needs it
    torchcde = None

import snopt_dyn  # noqa: E402
from snopt_dyn.preconditioner import ITO_DIFFUSION  # noqa: E402
from sde_helpers import SDE_ENGINE_NODE, LatentSDE, engine_nodes, latent_bm, latent_data  # noqa: E402

F64 = torch.float64
#: what a warning about layers on another library's solver says (SNOpt's "foreign" notes, the
#: adapter's note that a plain sdeint stays native)
FOREIGN_WORDS = ("own solver", "another library", "foreign", "not by the snopt_dyn engine")


# ------------------------------------------------------------------------------ shared checks
def _run(model, loss_fn, native: bool):
    """One forward and backward: ``(outputs, {name: grad}, engine nodes)``; ``loss_fn(model)`` returns
    ``(loss, *outputs)`` and builds its own Brownian path."""
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if native:
            with snopt_dyn.no_interception():
                loss, *outs = loss_fn(model)
        else:
            loss, *outs = loss_fn(model)
    nodes = engine_nodes(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [loss.detach()] + [o.detach() for o in outs], grads, nodes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.0 if torch.equal(a, b) else float((a - b).norm() / a.norm().clamp_min(1e-300))


def _check_equal_to_native(model, loss_fn, solves: int, rtol: float = 0.0) -> float:
    """Wrapped vs native: ``solves`` engine SDE solves and no other engine solve (none natively; torchcde's
    ``backend="torchsde"`` is an SDE solve with zero diffusion), every parameter with a gradient
    in both, outputs and gradients equal (``rtol=0``: bit for bit); returns the largest relative difference."""
    native = _run(model, loss_fn, native=True)
    routed = _run(model, loss_fn, native=False)
    assert routed[2] == {SDE_ENGINE_NODE: solves} and not native[2], (routed[2], native[2])
    assert set(routed[1]) == set(native[1]) == {n for n, _ in model.named_parameters()}
    worst = 0.0
    for a, b in zip(native[0], routed[0]):
        assert torch.equal(a, b)  # the forward is torchsde's own in either case
    for name, a in native[1].items():
        err = _rel(a, routed[1][name])
        assert err <= rtol, f"{name}: {err:.3g}"
        worst = max(worst, err)
    print(f"max relative difference of the gradients: {worst:.3g}")
    return worst


def _snopt_refresh(model, loss_fn):
    """One refresh iteration (``loss.backward(); precond.step()``): the warnings said and the roles."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond = snopt_dyn.SNOpt(model, update_freq=1, num_samples=3)
        model.zero_grad()
        loss_fn(model)[0].backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        precond.step()
    messages = [str(w.message) for w in caught]
    roles = {n: v["role"] for n, v in precond.layers().items()}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.grad, raw[n])}
    precond.remove()
    assert not [m for m in messages if any(w in m for w in FOREIGN_WORDS)], messages
    return messages, roles, changed


def _linear_names(module: nn.Module, prefix: str):
    return {f"{prefix}.{n}" if n else prefix for n, m in module.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------------ (a) latent SDE
B_LATENT = 4


def _latent_loss(model):
    xs, eps = latent_data(B_LATENT)
    # torchsde's default for an Itô diagonal SDE is srk, which needs space-time Lévy area
    bm = latent_bm(B_LATENT, levy_area_approximation="space-time")
    return (model(xs, eps, bm, method=None),)


def test_latent_sde_example():
    torch.manual_seed(0)
    model = snopt_dyn.wrap(LatentSDE("ito").double())
    _check_equal_to_native(model, _latent_loss, solves=1)

    messages, roles, changed = _snopt_refresh(model, _latent_loss)
    ito = [m for m in messages if "Itô" in m]
    assert len(ito) == 1 and "stratonovich" in ito[0], messages
    diffusion = _linear_names(model.g_nets, "g_nets")
    assert all(repr(name) in ito[0] for name in diffusion), ito[0]
    drift = _linear_names(model.f_net, "f_net") | _linear_names(model.h_net, "h_net")
    want = {**{n: "ode" for n in drift}, **{n: ITO_DIFFUSION for n in diffusion},
            "qz0_net": "static", "projector": "static"}
    assert roles == want, roles
    assert {n + ".weight" for n in drift} <= changed  # preconditioned
    assert not {n + ".weight" for n in diffusion} & changed  # raw


# ------------------------------------------------------------------------------ (b) Lorenz, context
OBS, LZ, LCTX, LHID, LNOISE, B_LORENZ = 3, 4, 3, 8, 2, 4
LORENZ_TS = torch.linspace(0, 0.5, 6, dtype=F64)  # 0.1 apart: on the dt = 0.025 grid
LORENZ_DT = 0.025


def _lorenz_data(batch=B_LORENZ, seed=0):
    """Noisy observations of a stochastic Lorenz system (Euler–Maruyama, fine steps, scaled to O(1))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, generator=g, dtype=F64) * 5
    sigma, rho, beta, h, sub = 10.0, 28.0, 8 / 3, 0.005, 20
    out = [x]
    for _ in range(len(LORENZ_TS) - 1):
        for _ in range(sub):
            drift = torch.stack([sigma * (x[:, 1] - x[:, 0]), x[:, 0] * (rho - x[:, 2]) - x[:, 1],
                                 x[:, 0] * x[:, 1] - beta * x[:, 2]], dim=1)
            x = x + drift * h + 0.5 * h ** 0.5 * torch.randn(batch, 3, generator=g, dtype=F64)
        out.append(x)
    xs = torch.stack(out) / 10
    return xs + 0.01 * torch.randn(xs.shape, generator=g, dtype=F64)


class LorenzLatentSDE(nn.Module):
    """A latent SDE for Lorenz data: the context ``ctx[i]`` (an encoding of the observations from
    ``t_i`` on) is set on the module before the solve and looked up by time inside ``f``; additive
    noise whose scale is a network of ``t``; Stratonovich."""

    sde_type, noise_type = "stratonovich", "additive"

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(OBS, LCTX)
        self.qz0_net = nn.Linear(LCTX, 2 * LZ)
        self.f_net = nn.Sequential(nn.Linear(LZ + LCTX, LHID), nn.Tanh(), nn.Linear(LHID, LZ))
        self.g_net = nn.Linear(1, LZ * LNOISE)
        self.projector = nn.Linear(LZ, OBS)
        self._ctx = None

    def contextualize(self, ctx):
        self._ctx = ctx  # (ts, ctx of shape (T, batch, LCTX))

    def f(self, t, y):
        ts, ctx = self._ctx
        i = min(int(torch.searchsorted(ts, t, right=True)), len(ts) - 1)
        return self.f_net(torch.cat((y, ctx[i]), dim=1))

    def g(self, t, y):
        scale = nn.functional.softplus(self.g_net(t.reshape(1, 1).expand(y.size(0), 1)))
        return 0.2 * scale.view(y.size(0), LZ, LNOISE)

    def forward(self, xs, eps, bm):
        codes = torch.tanh(self.encoder(xs))  # (T, batch, LCTX)
        steps = torch.arange(len(LORENZ_TS), 0, -1, dtype=F64).view(-1, 1, 1)
        ctx = torch.flip(torch.cumsum(torch.flip(codes, dims=(0,)), dim=0), dims=(0,)) / steps
        self.contextualize((LORENZ_TS, ctx))
        mean, logstd = self.qz0_net(ctx[0]).chunk(2, dim=1)
        z0 = mean + logstd.exp() * eps
        params = (ctx,) + tuple(self.f_net.parameters()) + tuple(self.g_net.parameters())
        zs = torchsde.sdeint_adjoint(self, z0, LORENZ_TS, bm=bm, dt=LORENZ_DT, method="midpoint",
                                     adjoint_params=params)
        nll = -torch.distributions.Normal(self.projector(zs), 0.05).log_prob(xs).sum(dim=(0, 2)).mean()
        kl = 0.5 * (mean ** 2 + (2 * logstd).exp() - 2 * logstd - 1).sum(dim=1).mean()
        return nll + kl, zs


def _lorenz_loss(model):
    xs = _lorenz_data()
    eps = torch.randn(B_LORENZ, LZ, generator=torch.Generator().manual_seed(1), dtype=F64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=float(LORENZ_TS[-1]), size=(B_LORENZ, LNOISE), dtype=F64,
                                   entropy=7)
    return model(xs, eps, bm)


def test_lorenz_latent_sde_with_a_context():
    torch.manual_seed(1)
    model = snopt_dyn.wrap(LorenzLatentSDE().double())
    _check_equal_to_native(model, _lorenz_loss, solves=1)
    assert model.encoder.weight.grad.abs().sum() > 0  # through the context in adjoint_params

    messages, roles, changed = _snopt_refresh(model, _lorenz_loss)
    assert not [m for m in messages if "Itô" in m], messages
    field = _linear_names(model.f_net, "f_net") | {"g_net"}
    assert roles == {**{n: "ode" for n in field}, "encoder": "static", "qz0_net": "static",
                     "projector": "static"}, roles
    assert {n + ".weight" for n in field} <= changed


# ------------------------------------------------------------------------------ (c) SDE-GAN
NOISE0, GNOISE, GHID, GDATA, DHID, B_GAN = 3, 2, 6, 2, 5, 4
GAN_TS = torch.arange(5, dtype=F64)  # the generated path's times (torchcde's default grid for 5 points)
GAN_DT = 0.5


class LipSwish(nn.Module):
    def forward(self, x):
        return 0.909 * nn.functional.silu(x)


def _mlp(n_in, n_out, hidden, final_tanh):
    layers = [nn.Linear(n_in, hidden), LipSwish(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers, nn.Tanh()) if final_tanh else nn.Sequential(*layers)


class GeneratorFunc(nn.Module):
    """A Stratonovich SDE with general noise in the one-call form ``f_and_g`` (time as an input)."""

    sde_type, noise_type = "stratonovich", "general"

    def __init__(self):
        super().__init__()
        self.drift = _mlp(1 + GHID, GHID, 8, final_tanh=True)
        self.diffusion = _mlp(1 + GHID, GHID * GNOISE, 8, final_tanh=True)

    def f_and_g(self, t, x):
        tx = torch.cat([t.expand(x.size(0), 1), x], dim=1)
        return self.drift(tx), self.diffusion(tx).view(x.size(0), GHID, GNOISE)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.initial = nn.Linear(NOISE0, GHID)
        self.func = GeneratorFunc()
        self.readout = nn.Linear(GHID, GDATA)

    def forward(self, init_noise, bm, adjoint=True):
        x0 = self.initial(init_noise)
        if adjoint:
            xs = torchsde.sdeint_adjoint(self.func, x0, GAN_TS, bm=bm, method="reversible_heun", dt=GAN_DT,
                                         adjoint_method="adjoint_reversible_heun")
        else:
            xs = torchsde.sdeint(self.func, x0, GAN_TS, bm=bm, method="reversible_heun", dt=GAN_DT)
        ys = self.readout(xs.transpose(0, 1))  # (batch, T, GDATA)
        ts = GAN_TS.view(1, -1, 1).expand(ys.size(0), -1, 1)
        return torchcde.linear_interpolation_coeffs(torch.cat([ts, ys], dim=2))


class DiscriminatorFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp(DHID, DHID * (1 + GDATA), 8, final_tanh=True)

    def forward(self, t, h):
        return self.net(h).view(h.size(0), DHID, 1 + GDATA)


class Discriminator(nn.Module):
    """A Neural CDE over the generated path (time channel first), solved by torchsde's reversible Heun."""

    def __init__(self):
        super().__init__()
        self.initial = nn.Linear(1 + GDATA, DHID)
        self.func = DiscriminatorFunc()
        self.readout = nn.Linear(DHID, 1)

    def forward(self, coeffs, adjoint=True):
        path = torchcde.LinearInterpolation(coeffs)
        h0 = self.initial(path.evaluate(path.interval[0]))
        extra = dict(adjoint_method="adjoint_reversible_heun",
                     adjoint_params=(coeffs,) + tuple(self.func.parameters())) if adjoint else {}
        hs = torchcde.cdeint(path, self.func, h0, path.interval, adjoint=adjoint, backend="torchsde",
                             method="reversible_heun", dt=GAN_DT, **extra)
        return self.readout(hs[:, -1]).mean()


class SDEGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = Generator()
        self.discriminator = Discriminator()


def _gan_loss(adjoint):
    def loss(model):
        noise = torch.randn(B_GAN, NOISE0, generator=torch.Generator().manual_seed(2), dtype=F64)
        bm = torchsde.BrownianInterval(t0=0.0, t1=float(GAN_TS[-1]), size=(B_GAN, GNOISE), dtype=F64,
                                       entropy=9, levy_area_approximation="space-time")
        coeffs = model.generator(noise, bm, adjoint=adjoint)
        return model.discriminator(coeffs, adjoint=adjoint), coeffs
    return loss


@pytest.mark.parametrize("solve", ["sdeint_adjoint", "sdeint"])
def test_sde_gan(solve):
    if torchcde is None:
        pytest.skip("torchcde is not installed")
    adjoint = solve == "sdeint_adjoint"
    torch.manual_seed(2)
    model = snopt_dyn.wrap(SDEGAN().double())
    # generator and discriminator both on the engine; plain sdeint: reversible Heun's adjoint against
    # back-propagation through torchsde's solver
    _check_equal_to_native(model, _gan_loss(adjoint), solves=2, rtol=0.0 if adjoint else 1e-8)

    messages, roles, changed = _snopt_refresh(model, _gan_loss(adjoint))
    assert not [m for m in messages if "Itô" in m], messages
    gen, dis = model.generator, model.discriminator
    field = _linear_names(gen.func, "generator.func") | _linear_names(dis.func, "discriminator.func")
    static = {"generator.initial", "generator.readout", "discriminator.initial", "discriminator.readout"}
    assert roles == {**{n: "ode" for n in field}, **{n: "static" for n in static}}, roles
    assert {n + ".weight" for n in field} <= changed

"""Gallery: the model patterns of torchdiffeq's, torchcde's and torchdyn's examples, each rewritten here
in a few lines of our own, each wrapped with one ``snopt_dyn.wrap`` and checked against the same
model unwrapped: the engine is used, outputs and gradients equal native (within solver tolerance),
SNOpt finds the field's layers as ODE layers, and a few SNOpt steps lower the loss.

Each pattern's ``loss`` is the user's training-loop code (it calls the solver where the example
does: inside ``forward``, or in the loop with ``wrap(func)`` first).  Run with ``-s`` for the table.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence

import pytest
import torch
import torchdiffeq
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

import snopt_dyn
from snopt_dyn.interception import no_interception

torchcde = pytest.importorskip("torchcde")
pytest.importorskip("torchdyn")
from torchdyn.core import NeuralODE  # noqa: E402
from torchdyn.models import CNF as DynCNF, autograd_trace  # noqa: E402
from torchdyn.nn import Augmenter, DataControl, DepthCat, Fourier, GalLinear  # noqa: E402

ORIG = {"odeint": torchdiffeq.odeint, "odeint_adjoint": torchdiffeq.odeint_adjoint}
DT = torch.float64
TOL = 1e-7
TABLE: Dict[str, dict] = {}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(*sizes, act=nn.Tanh):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


class Last(nn.Module):
    def forward(self, sol):
        return sol[-1]


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ====================================================================== torchdiffeq examples
class SpiralField(nn.Module):
    """ode_demo: the field is the only module; the loop calls odeint(func, batch_y0, batch_t)."""

    def __init__(self):
        super().__init__()
        self.net = mlp(2, 16, 2)

    def forward(self, t, y):
        return self.net(y ** 3)


SPIRAL_T = torch.linspace(0, 1, 6, dtype=DT)
with torch.no_grad():
    SPIRAL_Y0 = torch.randn(5, 1, 2, dtype=DT, generator=_gen(1))
    _A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=DT)
    SPIRAL_Y = ORIG["odeint"](lambda t, y: (y ** 3) @ _A, SPIRAL_Y0, SPIRAL_T)


def ode_demo_loss(func, solve=None):
    pred = (solve or odeint)(func, SPIRAL_Y0, SPIRAL_T, rtol=TOL, atol=TOL)
    return (pred - SPIRAL_Y).abs().mean(), pred


class LatentODE(nn.Module):
    """latent_ode: a recognition RNN, a latent field and a decoder; the loop solves the field."""

    def __init__(self, obs=2, latent=2, hidden=8):
        super().__init__()
        self.i2h, self.h2o = nn.Linear(obs + hidden, hidden), nn.Linear(hidden, 2 * latent)
        self.func = nn.Sequential(nn.Linear(latent, hidden), nn.ELU(), nn.Linear(hidden, latent))
        self.dec = mlp(latent, hidden, obs, act=nn.ReLU)
        self.hidden = hidden


class LatentField(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, z):
        return self.net(z)


LAT_T = torch.linspace(0, 1, 5, dtype=DT)
LAT_X = torch.sin(LAT_T[None, :, None] * 3 + torch.randn(4, 1, 2, dtype=DT, generator=_gen(2)))


def latent_ode_loss(model, solve=None):
    h = LAT_X.new_zeros(LAT_X.shape[0], model.hidden)
    for k in reversed(range(LAT_X.shape[1])):
        h = torch.tanh(model.i2h(torch.cat([LAT_X[:, k], h], -1)))
    mean, logvar = model.h2o(h).chunk(2, -1)
    z0 = mean + torch.randn(mean.shape, dtype=DT, generator=_gen(3)) * torch.exp(0.5 * logvar)
    pred_z = (solve or odeint)(model.field, z0, LAT_T, rtol=TOL, atol=TOL).permute(1, 0, 2)
    pred_x = model.dec(pred_z)
    kl = 0.5 * (mean ** 2 + logvar.exp() - logvar - 1).sum(-1).mean()
    return ((pred_x - LAT_X) ** 2).mean() + 0.01 * kl, pred_x


def build_latent():
    model = LatentODE()
    model.field = LatentField(model.func)
    return model


class ConcatConv2d(nn.Module):
    """odenet_mnist: a conv that sees t as an extra channel (tanh instead of the example's ReLU
    here: kinks make every adaptive solver's gradient converge slowly, and the comparison noisy)."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim + 1, dim, 3, padding=1)

    def forward(self, t, x):
        return self.conv(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))


class ConvField(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(2, dim), ConcatConv2d(dim)
        self.norm2, self.conv2 = nn.GroupNorm(2, dim), ConcatConv2d(dim)

    def forward(self, t, x):
        return self.conv2(t, torch.tanh(self.norm2(self.conv1(t, torch.tanh(self.norm1(x))))))


class ODEBlock(nn.Module):
    """odenet_mnist's ODEBlock: odeint inside forward, the horizon as an attribute."""

    def __init__(self, odefunc):
        super().__init__()
        self.odefunc = odefunc
        self.integration_time = torch.tensor([0.0, 1.0], dtype=DT)

    def forward(self, x):
        return odeint_adjoint(self.odefunc, x, self.integration_time, rtol=TOL, atol=TOL)[1]


IMG = torch.randn(4, 1, 6, 6, dtype=DT, generator=_gen(4))
IMG_Y = torch.tensor([0, 1, 2, 1])


def build_odenet():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ODEBlock(ConvField()), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def classify(model, x=IMG, y=IMG_Y):
    out = model(x)
    return nn.functional.cross_entropy(out, y), out


class HyperCNF(nn.Module):
    """cnf: a continuous normalising flow whose weights come from a hypernetwork of t; (z, logp) state."""

    def __init__(self, dim=2, hidden=8, width=4):
        super().__init__()
        self.dim, self.width = dim, width
        self.fc1, self.fc2, self.fc3 = nn.Linear(1, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 3 * width * dim + width)

    def forward(self, t, states):
        z = states[0]
        with torch.enable_grad():
            z = z.requires_grad_(True) if not z.requires_grad else z
            p = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(t.reshape(1, 1).to(z)))))).reshape(-1)
            n = self.width * self.dim
            w, u = p[:n].reshape(self.width, self.dim, 1), p[n:2 * n].reshape(self.width, 1, self.dim)
            g, b = torch.sigmoid(p[2 * n:3 * n].reshape(self.width, 1, self.dim)), p[3 * n:].reshape(self.width, 1, 1)
            h = torch.tanh(z.unsqueeze(0) @ w + b)
            dz = (h @ (u * g)).mean(0)
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(self.dim))
        return dz, -trace.unsqueeze(1)


CNF_X = torch.randn(8, 2, dtype=DT, generator=_gen(5)) * 0.5 + 1.0


def cnf_loss(func, solve=None):
    t = torch.tensor([1.0, 0.0], dtype=DT)
    z, logp = (solve or odeint)(func, (CNF_X, torch.zeros(8, 1, dtype=DT)), t, rtol=TOL, atol=TOL)
    prior = -0.5 * (z[-1] ** 2).sum(-1) - torch.log(torch.tensor(2 * torch.pi, dtype=DT))
    return -(prior - logp[-1].squeeze(1)).mean(), z[-1]


class AttributeBlock(nn.Module):
    """The SNOpt reference code: ``self.odesolve = odeint_adjoint`` stored on the module."""

    def __init__(self):
        super().__init__()
        self.odefunc, self.head = LatentField(mlp(2, 16, 2)), nn.Linear(2, 3)
        self.odesolve = odeint_adjoint
        self.t = torch.tensor([0.0, 1.0], dtype=DT)

    def forward(self, x):
        return self.head(self.odesolve(self.odefunc, x, self.t, rtol=TOL, atol=TOL)[-1])


XY = torch.randn(16, 2, dtype=DT, generator=_gen(6))
XY_Y = (XY[:, 0] > 0).long() + (XY[:, 1] > 0).long()


# ======================================================================== torchcde examples
class CDEFunc(nn.Module):
    def __init__(self, channels, hidden=4):
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.l1, self.l2 = nn.Linear(hidden, 8), nn.Linear(8, hidden * channels)

    def forward(self, t, z):
        return torch.tanh(self.l2(torch.tanh(self.l1(z)))).view(*z.shape[:-1], self.hidden, self.channels)


class NeuralCDE(nn.Module):
    """time_series_classification (``lengths=None``) and irregular_data (NaNs, variable length)."""

    tol = 1e-6  # CDE solves are the dearest of the gallery

    def __init__(self, channels, hidden=4, classes=2):
        super().__init__()
        self.initial, self.func, self.readout = nn.Linear(channels, hidden), CDEFunc(channels, hidden), nn.Linear(hidden, classes)

    def forward(self, coeffs, lengths=None):
        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        if lengths is None:
            return self.readout(torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, rtol=self.tol, atol=self.tol)[:, -1])
        zs = torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.grid_points, rtol=self.tol, atol=self.tol,
                             options=dict(jump_t=X.grid_points))  # the filled-in pieces join with kinks
        return self.readout(zs[torch.arange(len(lengths)), lengths - 1])


def _series(n=6, length=8, seed=7):
    g = _gen(seed)
    t = torch.linspace(0, 1, length, dtype=DT)
    x = torch.randn(n, length, 2, dtype=DT, generator=g).cumsum(1) * 0.3
    return t, x, (x[:, -1, 0] > 0).long()


_T, _X, CDE_Y = _series()
CDE_COEFFS = torchcde.natural_cubic_coeffs(torch.cat([_T.expand(6, 8).unsqueeze(-1), _X], -1))
_Xn = _X.clone()
_Xn[torch.rand(_Xn.shape, generator=_gen(8)) < 0.2] = float("nan")  # missing observations
LENGTHS = torch.tensor([8, 8, 6, 5, 7, 4])
for _i, _l in enumerate(LENGTHS):
    _Xn[_i, _l:] = float("nan")  # variable length: padded, filled forward by the interpolation
_mask = (~torch.isnan(_Xn[..., :1])).cumsum(1).to(DT)
IRR_COEFFS = torchcde.hermite_cubic_coefficients_with_backward_differences(
    torch.cat([_T.expand(6, 8).unsqueeze(-1), _mask, _Xn], -1))


# ========================================================================= torchdyn tutorials
def node(field, **kw):
    kw = dict(dict(solver="dopri5", sensitivity="adjoint", atol=TOL, rtol=TOL, atol_adjoint=TOL, rtol_adjoint=TOL), **kw)
    return quiet(NeuralODE, field, **kw)


class Learner(nn.Module):
    """torchdyn's quickstart: ``t_eval, y_hat = model(x, t_span)``; the loss on ``y_hat[-1]``."""

    def __init__(self, model, head=None):
        super().__init__()
        self.model, self.head = model, head or nn.Identity()
        self.register_buffer("t_span", torch.linspace(0, 1, 2, dtype=DT), persistent=False)

    def forward(self, x):
        _, y_hat = self.model(x, self.t_span)
        return self.head(y_hat[-1])


def dyn_cnf_loss(model, solve=None):
    _, z = model.node(model.aug(CNF_X), model.t_span)
    z = z[-1]
    prior = -0.5 * (z[:, 1:] ** 2).sum(-1)
    return -(prior - z[:, 0]).mean(), z


class CNFLearner(nn.Module):
    """torchdyn's CNF tutorial: an Augmenter column carries the log-density change."""

    def __init__(self):
        super().__init__()
        self.aug, self.node = Augmenter(1, 1), node(DynCNF(mlp(2, 8, 2), trace_estimator=autograd_trace))
        self.t_span = torch.linspace(0, 1, 2, dtype=DT)


class ConvLearner(Learner):
    """torchdyn's image classification: a conv stem, a conv field, pooling and a linear head."""

    def __init__(self):
        super().__init__(node(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1))),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
        self.stem = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return super().forward(self.stem(x))


class AugLearner(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(Augmenter(1, 2), node(mlp(4, 16, 4), return_t_eval=False), Last(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x)


# =================================================================================== patterns
@dataclass
class Pattern:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable  # loss(model) -> (loss, output): the user's training-loop code
    ode_layers: Sequence[str]
    target: Callable = lambda m: m  # what the user passes to snopt_dyn.wrap
    one_line: str = "snopt_dyn.wrap(model)"
    lr: float = 0.05
    grad_tol: float = 1e-5
    skipped: Sequence[str] = field(default_factory=tuple)  # layers SNOpt must leave out, with a warning
    dtype: torch.dtype = DT  # torchdyn's Galerkin layers only run in float32
    fwd_tol: float = 1e-5


PATTERNS = [
    Pattern("torchdiffeq ode_demo", SpiralField, ode_demo_loss, ["net.0", "net.2"],
            one_line="func = snopt_dyn.wrap(ODEFunc()); pred_y = odeint(func, batch_y0, batch_t)"),
    Pattern("torchdiffeq latent_ode", build_latent, latent_ode_loss, ["func.0", "func.2"], target=lambda m: m.field,
            one_line="snopt_dyn.wrap(func)  # then odeint(func, z0, samp_ts) in the loop, as before"),
    Pattern("torchdiffeq odenet_mnist ODEBlock", build_odenet, classify, ["1.odefunc.conv1.conv", "1.odefunc.conv2.conv"],
            one_line="model = snopt_dyn.wrap(nn.Sequential(*downsampling, ODEBlock(ODEfunc(64)), *fc))",
            skipped=["1.odefunc.norm1"]),
    Pattern("torchdiffeq cnf (hypernetwork)", HyperCNF, cnf_loss, ["fc1", "fc2", "fc3"], lr=0.02, grad_tol=1e-4,
            one_line="func = snopt_dyn.wrap(CNF(...)); odeint(func, (z_t1, logp_diff_t1), t)"),
    Pattern("ODEBlock with self.odesolve", AttributeBlock, lambda m: classify(m, XY, XY_Y), ["odefunc.net.0", "odefunc.net.2"],
            one_line="model = snopt_dyn.wrap(model)  # self.odesolve = odeint_adjoint is rerouted"),
    Pattern("torchcde time series classification", lambda: NeuralCDE(3),
            lambda m: classify(lambda c: m(c), CDE_COEFFS, CDE_Y), ["func.l1", "func.l2"],
            one_line="model = snopt_dyn.wrap(NeuralCDE(...))"),
    Pattern("torchcde irregular (NaN, variable length)", lambda: NeuralCDE(4),
            lambda m: classify(lambda c: m(c, LENGTHS), IRR_COEFFS, CDE_Y), ["func.l1", "func.l2"],
            one_line="model = snopt_dyn.wrap(NeuralCDE(...))"),
    Pattern("torchdyn quickstart", lambda: Learner(node(mlp(2, 16, 2), solver="tsit5"), nn.Linear(2, 3)),
            lambda m: classify(m, XY, XY_Y), ["model.vf.vf.vf.0", "model.vf.vf.vf.2"],
            one_line="learner = Learner(snopt_dyn.wrap(NeuralODE(f, sensitivity='adjoint')))"),
    Pattern("torchdyn DepthCat", lambda: Learner(node(nn.Sequential(DepthCat(1), mlp(3, 16, 2))), nn.Linear(2, 3)),
            lambda m: classify(m, XY, XY_Y), ["model.vf.vf.vf.1.0", "model.vf.vf.vf.1.2"]),
    Pattern("torchdyn DataControl", lambda: Learner(node(nn.Sequential(DataControl(), mlp(4, 16, 2))), nn.Linear(2, 3)),
            lambda m: classify(m, XY, XY_Y), ["model.vf.vf.vf.1.0", "model.vf.vf.vf.1.2"]),
    Pattern("torchdyn Augmenter", AugLearner, lambda m: classify(m, XY, XY_Y), ["net.1.vf.vf.vf.0", "net.1.vf.vf.vf.2"]),
    Pattern("torchdyn GalLinear (skipped, float32)", lambda: Learner(node(nn.Sequential(
        DepthCat(1), GalLinear(2, 8, expfunc=Fourier(3)), nn.Tanh(), nn.Linear(8, 2)), solver="tsit5", atol=1e-5,
        rtol=1e-5, atol_adjoint=1e-5, rtol_adjoint=1e-5), nn.Linear(2, 3)),
        lambda m: classify(m, XY.float(), XY_Y), ["model.vf.vf.vf.3"], skipped=["model.vf.vf.vf.1"],
        dtype=torch.float32, fwd_tol=1e-4, grad_tol=1e-3),
    Pattern("torchdyn CNF", CNFLearner, dyn_cnf_loss, ["node.vf.vf.vf.net.0", "node.vf.vf.vf.net.2"], lr=0.02),
    Pattern("torchdyn conv image", ConvLearner, classify, ["model.vf.vf.vf.0", "model.vf.vf.vf.2"]),
]


def _make(pattern, wrapped):
    torch.manual_seed(0)
    model = quiet(pattern.build).to(pattern.dtype)
    if wrapped:
        snopt_dyn.wrap(pattern.target(model))
    return model


def _grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _step_time(model, pattern, solve=None, reps=2):
    start = time.perf_counter()
    for _ in range(reps):
        model.zero_grad()
        _call_loss(pattern, model, solve)[0].backward()
    return (time.perf_counter() - start) / reps


def _call_loss(pattern, model, solve=None):
    if solve is not None:
        return pattern.loss(model, solve)
    return pattern.loss(model)


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_gallery_pattern(pattern):
    native, wrapped = _make(pattern, False), _make(pattern, True)
    loop_solves = pattern.loss in (ode_demo_loss, latent_ode_loss, cnf_loss)
    solve_native = ORIG["odeint"] if loop_solves else None
    with no_interception():  # the unwrapped twin must never reach the engine
        loss_n, out_n = _call_loss(pattern, native, solve_native)
        loss_n.backward()
    snopt_dyn.nfe.reset()
    loss_w, out_w = _call_loss(pattern, wrapped)
    fwd = snopt_dyn.nfe.forward
    loss_w.backward()
    engine = fwd > 0 and snopt_dyn.nfe.backward > 0
    assert engine, f"{pattern.name}: not solved by the engine ({snopt_dyn.nfe})"
    fwd_diff = float((out_n.detach() - out_w.detach()).abs().max())
    g_n, g_w = _grads(native), _grads(wrapped)
    scale = max(float(g.abs().max()) for g in g_n)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(g_n, g_w)) / max(scale, 1e-12)
    assert fwd_diff < pattern.fwd_tol, fwd_diff
    assert grad_diff < pattern.grad_tol, grad_diff

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond = snopt_dyn.SNOpt(wrapped, update_freq=2, num_samples=3)
    for name in pattern.skipped:
        assert any(name in str(w.message) for w in caught), f"SNOpt did not warn about {name}"
        assert name not in precond.layers()
    opt = torch.optim.SGD(wrapped.parameters(), lr=pattern.lr)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = _call_loss(pattern, wrapped)[0]
        loss.backward()
        precond.step()
        opt.step()
        losses.append(float(loss.detach()))
    roles = precond.layers()
    for name in pattern.ode_layers:
        assert roles[name]["role"] == "ode", (name, roles[name])
    assert losses[-1] < losses[0], losses
    precond.remove()

    with no_interception():
        t_n = _step_time(native, pattern, solve_native)
    t_w = _step_time(wrapped, pattern)
    TABLE[pattern.name] = dict(engine=engine, fwd=fwd_diff, grad=grad_diff, ratio=t_w / t_n,
                               roles=f"{sum(r['role'] == 'ode' for r in roles.values())} ode / "
                                     f"{sum(r['role'] == 'static' for r in roles.values())} static",
                               skipped=", ".join(pattern.skipped) or "-", line=pattern.one_line)


def test_gallery_table():
    """Prints the table of the closing note (``-s``)."""
    print("\n| pattern | engine | fwd diff | grad diff (rel) | SNOpt roles | skipped | step time wrapped/native |")
    print("|---|---|---|---|---|---|---|")
    for name, r in TABLE.items():
        print(f"| {name} | {'yes' if r['engine'] else 'no'} | {r['fwd']:.1e} | {r['grad']:.1e} | {r['roles']} | "
              f"{r['skipped']} | {r['ratio']:.2f} |")
    for name, r in TABLE.items():
        print(f"{name}: {r['line']}")

"""``snopt_dyn.wrap`` on torchsde models: which solves reach the engine, and with what numbers.

Wrapped and native runs share the model (native = the same model inside ``no_interception()``) and
a Brownian path (a fresh ``BrownianInterval`` with the same entropy for each run).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

torchsde = pytest.importorskip("torchsde")

from sde_helpers import CONTEXT, DATA, DT, LATENT, TS, LatentSDE, engine_used, latent_bm, latent_data
import snopt_dyn  # noqa: E402

B = 5


def _data(seed=0):
    return latent_data(B, seed)


def _bm(m=LATENT + 1, entropy=11):
    return latent_bm(B, m, entropy)


def _loss_and_grads(model, native: bool, **kwargs):
    model.zero_grad()
    xs, eps = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if native:
            with snopt_dyn.no_interception():
                loss = model(xs, eps, _bm(), **kwargs)
        else:
            loss = model(xs, eps, _bm(), **kwargs)
    used = engine_used(loss)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for p in model.parameters()], used


@pytest.mark.parametrize("method", ["euler", "milstein"])
def test_wrapped_latent_sde_adjoint_equals_native(method):
    torch.manual_seed(0)
    model = snopt_dyn.wrap(LatentSDE().double())
    native = _loss_and_grads(model, native=True, method=method)
    routed = _loss_and_grads(model, native=False, method=method)
    assert routed[2] and not native[2]
    assert torch.equal(native[0], routed[0])
    for a, b in zip(native[1], routed[1]):
        assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in routed[1][:4])  # the encoder gets its gradient through the context


def test_plain_sdeint_reversible_heun_runs_on_the_engine_with_backprops_gradient():
    torch.manual_seed(1)
    model = snopt_dyn.wrap(LatentSDE("stratonovich").double())
    native = _loss_and_grads(model, native=True, adjoint=False, method="reversible_heun")
    routed = _loss_and_grads(model, native=False, adjoint=False, method="reversible_heun")
    assert routed[2] and not native[2]
    assert torch.equal(native[0], routed[0])
    for a, b in zip(native[1], routed[1]):
        assert (a - b).norm() <= 1e-8 * max(a.norm(), 1e-30), ((a - b).norm() / a.norm()).item()


def test_plain_sdeint_elsewhere_stays_native_and_says_so():
    from snopt_dyn.adapters import torchsde as adapter
    adapter._warned.discard("native-sdeint")
    torch.manual_seed(2)
    model = snopt_dyn.wrap(LatentSDE().double())
    xs, eps = _data()
    with pytest.warns(RuntimeWarning, match="sde_backprop='adjoint'"):
        loss = model(xs, eps, _bm(), adjoint=False, method="euler")
    assert not engine_used(loss)


def test_sde_backprop_adjoint_routes_plain_sdeint():
    """``wrap(sde_backprop="adjoint")``: plain ``sdeint`` gets the engine's stochastic adjoint, with the
    gradients of ``sdeint_adjoint`` over the module's tensors (torchsde's default adjoint method)."""
    torch.manual_seed(3)
    model = snopt_dyn.wrap(LatentSDE().double(), sde_backprop="adjoint")
    routed = _loss_and_grads(model, native=False, adjoint=False, method="euler")
    assert routed[2]

    model.zero_grad()
    xs, eps = _data()
    with snopt_dyn.no_interception():
        ctx = torch.flip(model.encoder(torch.flip(xs, dims=(0,)))[0], dims=(0,))
        model._ctx = (TS, ctx)
        mean, logstd = model.qz0_net(ctx[0]).chunk(2, dim=1)
        z0 = mean + logstd.exp() * eps
        zs, log_ratio = snopt_dyn.sdeint_adjoint(model, z0, TS, bm=_bm(), dt=DT, logqp=True, method="euler")
        log_pxs = torch.distributions.Normal(model.projector(zs), 0.1).log_prob(xs).sum(dim=(0, 2)).mean()
        loss = -log_pxs + log_ratio.sum(dim=0).mean() + 0.5 * (mean ** 2).sum(dim=1).mean()
    loss.backward()
    assert torch.equal(loss.detach(), routed[0])
    for p, g in zip(model.parameters(), routed[1]):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-12)


def test_plain_sdeint_reading_an_unlisted_tensor_stays_native():
    """A drift reading a tensor requiring grad that the module does not hold (here in a tuple) cannot
    get its gradient from the engine: the call keeps torchsde's solver, and says so."""
    class Closed(nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self, w):
            super().__init__()
            self.net = nn.Linear(LATENT, LATENT)
            self.held = (w,)

        def f(self, t, y):
            return self.net(y) * self.held[0]

        def g(self, t, y):
            return torch.sigmoid(y)

    w = torch.randn(LATENT, dtype=torch.float64, requires_grad=True)
    sde = snopt_dyn.wrap(Closed(w).double())
    y0 = torch.randn(B, LATENT, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="adjoint_params"):
        ys = torchsde.sdeint(sde, y0, TS, bm=_bm(LATENT), dt=DT, method="reversible_heun")
    assert not engine_used(ys.sum())
    ys.sum().backward()
    assert w.grad is not None


def test_plain_sdeint_with_a_context_attribute_counts_its_gradient_once():
    """A drift reading a tensor attribute made from the module's own parameters (``self.ctx =
    self.enc(x)``; torchcde's interpolation holds ``_derivs`` made from ``_coeffs`` likewise): the routed
    plain ``sdeint`` gives the encoder back-propagation's gradient, not twice its part through the
    context (the engine differentiates the parameters, the context's history carries it once)."""
    class WithContext(nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(DATA, LATENT)
            self.net = nn.Linear(LATENT, LATENT)

        def f(self, t, y):
            return torch.tanh(self.net(y)) + self.ctx

        def g(self, t, y):
            return 0.3 * torch.sigmoid(y)

        def forward(self, x, y0):
            self.ctx = self.enc(x)
            return torchsde.sdeint(self, y0, TS, bm=_bm(LATENT), dt=DT, method="reversible_heun")

    torch.manual_seed(7)
    sde = snopt_dyn.wrap(WithContext().double())
    x, y0 = torch.randn(B, DATA, dtype=torch.float64), torch.randn(B, LATENT, dtype=torch.float64)
    with snopt_dyn.no_interception():
        sde(x, y0)[-1].square().sum().backward()
    native = [p.grad.clone() for p in sde.parameters()]
    sde.zero_grad()
    loss = sde(x, y0)[-1].square().sum()
    assert engine_used(loss)
    loss.backward()
    for p, g in zip(sde.parameters(), native):
        assert (p.grad - g).norm() <= 1e-8 * g.norm(), ((p.grad - g).norm() / g.norm()).item()


def test_unwrapped_sde_runs_natively():
    torch.manual_seed(4)
    model = LatentSDE().double()
    snopt_dyn.wrap(LatentSDE().double())  # installs the stand-ins
    assert torchsde.sdeint_adjoint is not torchsde._core.adjoint.sdeint_adjoint
    xs, eps = _data()
    assert not engine_used(model(xs, eps, _bm()))


def test_a_name_imported_before_wrap_is_rerouted(monkeypatch):
    """``from torchsde import sdeint_adjoint`` in a user module, taken before the first wrap, reaches
    the engine after it (module globals are rebound, as for torchdiffeq)."""
    import sys
    import types

    snopt_dyn.restore_originals()
    helper = types.ModuleType("sde_user_helper")
    helper.sdeint_adjoint = torchsde.sdeint_adjoint  # torchsde's own function
    monkeypatch.setitem(sys.modules, "sde_user_helper", helper)
    model = snopt_dyn.wrap(LatentSDE().double())
    assert helper.sdeint_adjoint is not torchsde._core.adjoint.sdeint_adjoint
    y0 = torch.randn(B, LATENT, dtype=torch.float64)
    model._ctx = (TS, torch.zeros(len(TS), B, CONTEXT, dtype=torch.float64))
    ys = helper.sdeint_adjoint(model, y0, TS, bm=_bm(LATENT), dt=DT, method="euler")
    assert engine_used(ys.sum())


def test_reversible_heun_notes_are_torchsde_s():
    """torchsde's warnings about reversible Heun off the step grid come out of the engine word for word."""
    def messages(solver):
        torch.manual_seed(6)
        sde = LatentSDE("stratonovich").double()
        sde._ctx = (TS, torch.zeros(len(TS), B, CONTEXT, dtype=torch.float64))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            solver(sde, torch.randn(B, LATENT, dtype=torch.float64), TS, bm=_bm(LATENT), dt=0.1,
                   method="reversible_heun")
        return [str(w.message) for w in caught]

    with snopt_dyn.no_interception():
        native = messages(torchsde.sdeint_adjoint)
    assert native and messages(snopt_dyn.sdeint_adjoint) == native


def test_restore_originals_puts_torchsde_back():
    snopt_dyn.wrap(LatentSDE().double())
    snopt_dyn.restore_originals()
    assert torchsde.sdeint_adjoint is torchsde._core.adjoint.sdeint_adjoint
    assert torchsde.sdeint is torchsde._core.sdeint.sdeint
    model = snopt_dyn.wrap(LatentSDE().double())  # and wrapping again reinstalls them
    xs, eps = _data()
    assert engine_used(model(xs, eps, _bm()))


def test_wrap_refuses_torchdyn_neural_sde_pointing_to_torchsde():
    neuralde = pytest.importorskip("torchdyn.core.neuralde")
    broken = neuralde.NeuralSDE.__new__(neuralde.NeuralSDE)  # torchdyn 1.0.6 cannot construct one
    nn.Module.__init__(broken)
    holder = nn.Sequential(nn.Linear(2, 2))
    holder.add_module("sde", broken)
    with pytest.raises(ValueError, match="torchsde.sdeint_adjoint"):
        snopt_dyn.wrap(holder)


def test_sde_backprop_must_be_known():
    with pytest.raises(ValueError, match="sde_backprop"):
        snopt_dyn.wrap(LatentSDE().double(), sde_backprop="backprop")


def test_torchcde_torchsde_backend_with_adjoint_runs_on_the_engine():
    torchcde = pytest.importorskip("torchcde")

    class CDEFunc(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(LATENT, LATENT * DATA)

        def forward(self, t, z):
            return torch.tanh(self.net(z)).view(z.size(0), LATENT, DATA)

    class CDE(nn.Module):
        def __init__(self):
            super().__init__()
            self.func = CDEFunc()

        def forward(self, coeffs, z0):
            X = torchcde.LinearInterpolation(coeffs)
            return torchcde.cdeint(X, self.func, z0, X.interval, backend="torchsde", dt=0.1, method="midpoint")

    torch.manual_seed(5)
    model = snopt_dyn.wrap(CDE().double())
    coeffs = torchcde.linear_interpolation_coeffs(torch.randn(B, 6, DATA, dtype=torch.float64))
    z0 = torch.randn(B, LATENT, dtype=torch.float64)
    out = model(coeffs, z0)
    assert engine_used(out.sum())
    out.square().sum().backward()
    routed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with snopt_dyn.no_interception():
        native = model(coeffs, z0)
    native.square().sum().backward()
    assert torch.equal(out, native)
    for p, g in zip(model.parameters(), routed):
        assert torch.equal(p.grad, g)


def test_plain_sdeint_of_a_product_form_sde_stays_native_and_says_why():
    """An SDE with only ``f_and_g_prod`` (no ``f`` to evaluate), routed to the engine's adjoint by
    ``sde_backprop="adjoint"``, cannot be checked for tensors it reads: the call keeps torchsde's
    solver and the warning names the product form (it used to claim the drift reads a tensor)."""
    class ProductOnly(nn.Module):
        noise_type, sde_type = "general", "ito"

        def __init__(self):
            super().__init__()
            self.net = nn.Linear(LATENT, LATENT)

        def f_and_g_prod(self, t, y, v):
            return self.net(y), 0.1 * v[:, :LATENT]

    sde = snopt_dyn.wrap(ProductOnly().double(), sde_backprop="adjoint")
    y0 = torch.randn(B, LATENT, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="product form") as caught:
        ys = torchsde.sdeint(sde, y0, TS, bm=_bm(LATENT), dt=DT, method="euler")
    assert not any("reads a tensor" in str(w.message) for w in caught)
    assert not engine_used(ys.sum())
    ys.sum().backward()
    assert sde.net.weight.grad is not None

"""SNOpt on SDEs (our extension of SNOpt's factors, snopt_dyn/curvature/sde_pairing.py).

Drift layers are paired with ``a(t_j)`` as ODE layers; diffusion layers with ``a ⊙ ΔW_j`` (diagonal) or
``a ΔW_jᵀ`` (general), back-propagated through ``g``; layers reaching an Itô diffusion stay raw.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchsde = pytest.importorskip("torchsde")

import snopt_dyn  # noqa: E402
from snopt_dyn import hooks  # noqa: E402
from snopt_dyn.preconditioner import ITO_DIFFUSION  # noqa: E402
from sde_helpers import LatentSDE, latent_bm, latent_data  # noqa: E402

B, D, M = 6, 3, 2
F64 = torch.float64


class ToySDE(nn.Module):
    """Drift ``tanh(f_net)``, diffusion ``½ sigmoid(g_net)`` (``(B, d)`` diagonal, ``(B, d, m)``
    general); ``trunk=True``: a Linear used by both ``f`` and ``g``; ``zero=True``: ``g ≡ 0`` (no layer)."""

    def __init__(self, noise_type="diagonal", sde_type="stratonovich", trunk=False, zero=False, hidden=5):
        super().__init__()
        self.noise_type, self.sde_type, self.zero = noise_type, sde_type, zero
        self.m = D if noise_type == "diagonal" else M
        self.trunk = nn.Linear(D, D) if trunk else None
        self.f_net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, D))
        self.g_net = nn.Linear(D, D if noise_type == "diagonal" else D * self.m)

    def _in(self, y):
        return torch.tanh(self.trunk(y)) if self.trunk is not None else y

    def f(self, t, y):
        return self.f_net(self._in(y)) - 0.5 * y

    def g(self, t, y):
        if self.zero:
            return torch.zeros_like(y)
        out = 0.5 * torch.sigmoid(self.g_net(self._in(y)))
        return out if self.noise_type == "diagonal" else out.view(y.size(0), D, self.m)


def _bm(sde, n=B, t1=1.0, entropy=5):
    return torchsde.BrownianInterval(t0=0.0, t1=t1, size=(n, sde.m), dtype=F64, entropy=entropy)


def _record(precond):
    """Every ``(module, x rows, g rows)`` SNOpt adds, in order."""
    rows, add = [], precond._add_ode

    def recording(module, x, g, pass_id, evaluation):
        rows.append((module, x.clone(), g.clone()))
        add(module, x, g, pass_id, evaluation)
    precond._add_ode = recording
    return rows


# ------------------------------------------------------------------------------ zero diffusion
def test_zero_diffusion_reduces_to_the_ode_engine():
    """g ≡ 0, midpoint at step h, vs the ODE engine with torchdiffeq's midpoint at step h: the same
    outputs and gradients, identical drift factors for the same sample times, no diffusion statistics."""
    h, J = 1 / 8, 4  # the cell midpoints 1/8, 3/8, ... are solver grid points
    torch.manual_seed(0)
    sde = ToySDE(zero=True).double()
    field = copy.deepcopy(sde)
    ode = lambda t, y: field.f(t, y)  # noqa: E731
    y0 = torch.randn(B, D, dtype=F64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    w = torch.randn(3, B, D, dtype=F64)

    p_sde = snopt_dyn.SNOpt(sde, update_freq=1, num_samples=J)
    rows_sde = _record(p_sde)
    ys = snopt_dyn.sdeint_adjoint(sde, y0, ts, bm=_bm(sde), method="midpoint", dt=h)
    (ys * w).sum().div(B).backward()

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.sde = field

        def forward(self, t, y):
            return self.sde.f(t, y)

    f_mod = Field()
    p_ode = snopt_dyn.SNOpt(f_mod, update_freq=1, num_samples=J)
    rows_ode = _record(p_ode)
    ys_ode = snopt_dyn.odeint_adjoint(f_mod, y0, ts, method="midpoint", options={"step_size": h})
    (ys_ode * w).sum().div(B).backward()
    torch.testing.assert_close(ys, ys_ode, rtol=0, atol=1e-12)
    for a, b in zip(sde.f_net.parameters(), field.f_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)

    assert {m for m, _, _ in rows_sde} == {sde.f_net[0], sde.f_net[2]}  # no use of g_net
    assert len(rows_sde) == len(rows_ode) == 2 * J
    p_sde.step()
    p_ode.step()
    fs, fo = p_sde.factors(), p_ode.factors()
    assert set(fs) == {"f_net.0", "f_net.2"} and set(fo) == {"sde.f_net.0", "sde.f_net.2"}
    for name in fs:
        (a1, g1, m1), (a2, g2, m2) = fs[name], fo["sde." + name]
        assert m1 == m2 == J
        assert torch.equal(a1, a2) and torch.equal(g1, g2), name  # bit for bit (seen)
    assert p_sde.layers()["g_net"]["role"] != "ode" and p_sde.layers()["g_net"]["G"] is None


# ------------------------------------------------------------------------------ explicit rows
@pytest.mark.parametrize("noise", ["diagonal", "general"])
def test_rows_equal_an_explicit_per_sample_loop(noise):
    """Diffusion rows: ``N · J_uᵀ (a_j ⊙ ΔW_j)`` (diagonal) or ``N · J_uᵀ (a_j ΔW_jᵀ)`` (general) at
    g_net's output, with input ``[z_j, 1]``; drift rows: ``N · Δ_j · J_uᵀ a_j`` -- one sample at a time."""
    J = 3
    torch.manual_seed(1)
    sde = ToySDE(noise).double()
    got = {}

    class Look(hooks.EngineObserver):
        def sde_sample_spec(self, s):
            return hooks.SampleSpec(count=J)

        def on_sde_samples(self, s, batch):
            got["batch"] = batch

    look = Look()
    handle = hooks.register_observer(look)
    precond = snopt_dyn.SNOpt(sde, update_freq=1, num_samples=J)
    rows = _record(precond)
    try:
        ys = snopt_dyn.sdeint_adjoint(sde, torch.randn(B, D, dtype=F64), [0.0, 0.6], bm=_bm(sde, t1=0.6),
                                      method="midpoint", dt=0.05)
        ys[-1].square().sum(1).mean().backward()
    finally:
        handle.remove()
    batch = got["batch"]
    g_rows = [(x, g) for m, x, g in rows if m is sde.g_net]
    f_rows = [(x, g) for m, x, g in rows if m is sde.f_net[0]]
    assert len(g_rows) == len(f_rows) == J
    for j in range(J):
        for b in range(B):
            z = batch.states[j, b:b + 1]
            a, dw, dt = batch.adjoints[j, b], batch.increments[j, b], batch.weights[j]
            u = sde.g_net(z).detach().requires_grad_()
            out = 0.5 * torch.sigmoid(u)
            out = out.view(D) if noise == "diagonal" else out.view(D, M)
            cot = a * dw if noise == "diagonal" else torch.outer(a, dw)
            (gu,) = torch.autograd.grad(out, u, cot)
            x_want = torch.cat([z[0], torch.ones(1, dtype=F64)])
            torch.testing.assert_close(g_rows[j][0][b, 0], x_want, rtol=0, atol=1e-14)
            torch.testing.assert_close(g_rows[j][1][b, 0], B * gu[0], rtol=1e-10, atol=1e-14)

            v = sde.f_net[0](z).detach().requires_grad_()
            (fv,) = torch.autograd.grad(sde.f_net[2](torch.tanh(v)), v, a.view(1, D))
            torch.testing.assert_close(f_rows[j][1][b, 0], B * dt * fv[0], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(f_rows[j][0][b, 0], x_want, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------ paired products
class _LeftEnds:
    """Sample at the left end of each cell (ΔW still over the whole cell): the Itô sum, biased."""

    def __init__(self, count):
        self.count = count

    def host_times(self, t0, t1):
        width = (t1 - t0) / self.count
        return [t0 + width * j for j in range(self.count)], width


class LeftEndSNOpt(snopt_dyn.SNOpt):
    def sde_sample_spec(self, sde):
        spec = super().sde_sample_spec(sde)
        return _LeftEnds(spec.count) if spec is not None else None


def _paired_sum_errors(cls, counts, trunk=False, n=128, sde_type="stratonovich", method="midpoint"):
    """Per layer and cell count: |Σ_samples Σ_rows ĝ x̄ᵀ / N - .grad| / |.grad| after one backward."""
    torch.manual_seed(0)
    sde = ToySDE(sde_type=sde_type, trunk=trunk).double()
    y0 = torch.randn(n, D, dtype=F64)
    out = {}
    for count in counts:
        sde.zero_grad()
        precond = cls(sde, update_freq=1, num_samples=count)
        rows = _record(precond)
        ys = snopt_dyn.sdeint_adjoint(sde, y0, [0.0, 1.0], bm=_bm(sde, n=n, entropy=3), method=method, dt=2e-3)
        ys[-1].square().sum(1).mean().backward()
        errs = {}
        for name, module in [("trunk", sde.trunk), ("f", sde.f_net[0]), ("g", sde.g_net)]:
            if module is None:
                continue
            mine = [(x, g) for m, x, g in rows if m is module]
            errs[name + "_uses"] = len(mine)
            if not mine:
                continue
            total = sum(torch.einsum("nlo,nli->oi", g.expand(n, -1, -1), x.expand(n, -1, -1)) for x, g in mine) / n
            grad = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
            errs[name] = float((total - grad).norm() / grad.norm())
        out[count] = errs
        precond.remove()
    return out


def test_paired_products_converge_to_the_gradient_and_a_left_end_sampler_fails():
    """Σ over samples of a layer's paired products approaches its .grad as the cells refine (midpoint
    cells); a left-end sampler stays off for the diffusion layer (the Itô bias) and fails the same check."""
    mid = _paired_sum_errors(snopt_dyn.SNOpt, (10, 50))
    left = _paired_sum_errors(LeftEndSNOpt, (50,))

    def passes(errs):  # the convergence criterion
        return errs[50]["g"] < 0.03 and errs[50]["f"] < 0.03 and errs[50]["g"] < errs[10]["g"]

    print("midpoint", mid, "left ends", left)
    assert passes(mid), mid
    assert not passes({10: mid[10], 50: left[50]}), left
    assert left[50]["g"] > 5 * mid[50]["g"]


def test_a_layer_used_by_f_and_g_counts_every_use():
    """A trunk Linear called by both f and g: 2 uses per sample, and only the two together sum to its
    gradient (dropping either use leaves a large error)."""
    errs = _paired_sum_errors(snopt_dyn.SNOpt, (50,), trunk=True)[50]
    assert errs["trunk_uses"] == 2 * 50 and errs["g_uses"] == 50 and errs["f_uses"] == 50
    assert errs["trunk"] < 0.03, errs


def test_ito_drift_layers_are_exact_and_diffusion_layers_get_no_rows():
    """Itô SDE (euler): a drift layer's gradient is an ordinary dt integral, so its paired products
    converge to .grad; the diffusion layer (Itô correction terms not derived) gets no rows at all."""
    errs = _paired_sum_errors(snopt_dyn.SNOpt, (10, 50), sde_type="ito", method="euler")
    assert errs[50]["g_uses"] == 0 and errs[50]["f_uses"] == 50, errs
    assert errs[50]["f"] < 0.003 and errs[50]["f"] < errs[10]["f"], errs  # seen: 0.16% (10), 0.05% (50)


# ------------------------------------------------------------------------------ invariances
class Model(nn.Module):
    """Encoder -> SDE (Stratonovich, diagonal) -> head: SDE layers and static (K-FAC) layers."""

    def __init__(self):
        super().__init__()
        self.enc, self.sde, self.head = nn.Linear(4, D), ToySDE(), nn.Linear(D, 2)

    def forward(self, x, bm):
        ys = snopt_dyn.sdeint_adjoint(self.sde, self.enc(x), [0.0, 0.5], bm=bm, method="midpoint", dt=0.05)
        return self.head(ys[-1])


class _Permuted(torchsde.BaseBrownian):
    """The path of ``base`` with its batch rows permuted: sample ``perm[i]``'s noise at row ``i``."""

    def __init__(self, base, perm):
        super().__init__()
        self.base, self.perm = base, perm

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        return self.base(ta, tb)[self.perm]

    shape = property(lambda self: self.base.shape)
    dtype = property(lambda self: self.base.dtype)
    device = property(lambda self: self.base.device)
    levy_area_approximation = property(lambda self: self.base.levy_area_approximation)

    def __repr__(self):
        return "Permuted"


def _train(model, loss_fn, steps=4, lr=0.05, perm=None, **kwargs):
    precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=4, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        opt.zero_grad()
        bm = torchsde.BrownianInterval(t0=0.0, t1=0.5, size=(8, D), dtype=F64, entropy=100 + step)
        loss_fn(model, bm if perm is None else _Permuted(bm, perm)).backward()
        precond.step()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    roles = {n: v["role"] for n, v in precond.layers().items()}
    precond.remove()
    return out, roles


def _assert_same(got, want, factor=1.0, rtol=1e-8):
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            err = (g[name] - factor * w[name]).norm() / (factor * w[name]).norm()
            assert err < rtol, f"step {step}, {name}: {err:.3g}"


def _xy(n=8):
    g = torch.Generator().manual_seed(6)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)


@pytest.mark.parametrize("moment", ["paper", "per_sample"])
def test_batch_permutation_and_sum_vs_mean(moment):
    """Permuting the batch (with its Brownian rows) changes no preconditioned gradient; the sum loss
    with ``loss_reduction="sum"`` gives B × the mean loss's, at refresh and other steps."""
    torch.manual_seed(7)
    base = Model().double()
    x, y = _xy()
    perm = torch.randperm(8)
    mean, roles = _train(copy.deepcopy(base), lambda m, bm: F.mse_loss(m(x, bm), y, reduction="sum") / 8,
                         moment=moment)
    assert roles == {"enc": "static", "sde.f_net.0": "ode", "sde.f_net.2": "ode", "sde.g_net": "ode", "head": "static"}
    permuted, _ = _train(copy.deepcopy(base), lambda m, bm: F.mse_loss(m(x[perm], bm), y[perm], reduction="sum") / 8,
                         perm=perm, moment=moment)
    _assert_same(permuted, mean)
    summed, _ = _train(copy.deepcopy(base), lambda m, bm: F.mse_loss(m(x, bm), y, reduction="sum"), lr=0.05 / 8,
                       loss_reduction="sum", moment=moment)
    _assert_same(summed, mean, factor=8)


# ------------------------------------------------------------------------------ latent SDE, wrapped
def _latent_data(seed=0):
    return latent_data(B, seed)


def _latent_bm(entropy=11):
    return latent_bm(B, entropy=entropy)


def _latent_step(model, precond, **kwargs):
    model.zero_grad()
    xs, eps = _latent_data()
    loss = model(xs, eps, _latent_bm(), **kwargs)
    ctx = model._ctx[1]  # the context tensor, passed in adjoint_params
    ctx.retain_grad()
    loss.backward()
    return loss.detach(), ctx.grad.clone(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("sde_type", ["stratonovich", "ito"])
def test_sampling_changes_no_gradient_and_a_context_gets_its_gradient(sde_type):
    """A refresh iteration (samples taken, fields evaluated again, ΔW queried) and a plain iteration on
    the same path: identical loss and gradients, the context tensor in adjoint_params included; the
    context gets no factors."""
    torch.manual_seed(2)
    model = snopt_dyn.wrap(LatentSDE(sde_type).double())
    method = "midpoint" if sde_type == "stratonovich" else "euler"
    precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampled = _latent_step(model, precond, method=method)
        assert precond.refreshing and precond.sampling_nfe == 4
        precond.step()  # not refreshing next: a plain iteration
        assert not precond.refreshing
        plain = _latent_step(model, precond, method=method)
    assert precond.sampling_nfe == 4
    assert torch.equal(sampled[0], plain[0]) and torch.equal(sampled[1], plain[1])
    assert sampled[1].abs().sum() > 0
    for a, b in zip(sampled[2], plain[2]):
        assert torch.equal(a, b)
    names = {n for n, _ in model.named_modules()}
    assert set(precond.factors()) <= names


@pytest.mark.parametrize("sde_type", ["stratonovich", "ito"])
def test_snopt_steps_a_wrapped_latent_sde(sde_type):
    """SNOpt.step() on a wrapped torchsde latent SDE: finite preconditioned gradients; drift, prior and
    diffusion Linear layers are "ode" (Stratonovich), or the diffusion ones "ito-diffusion" and raw (Itô,
    said once); encoder/read-out layers "static"; nothing "foreign"."""
    torch.manual_seed(3)
    model = snopt_dyn.wrap(LatentSDE(sde_type).double())
    method = "midpoint" if sde_type == "stratonovich" else "euler"
    precond = snopt_dyn.SNOpt(model, update_freq=1, num_samples=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        opt.zero_grad()
        xs, eps = _latent_data()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(xs, eps, _latent_bm(entropy=step), method=method).backward()
            raw = {n: p.grad.clone() for n, p in model.named_parameters()}
            precond.step()
        ito_notes = [w for w in caught if "Itô" in str(w.message)]
        assert len(ito_notes) == (1 if sde_type == "ito" and step == 0 else 0), [str(w.message) for w in caught]
        if ito_notes:
            assert "stratonovich" in str(ito_notes[0].message)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    roles = {n: v["role"] for n, v in precond.layers().items()}
    diffusion = ITO_DIFFUSION if sde_type == "ito" else "ode"
    for name, role in roles.items():
        want = "static" if name in ("qz0_net", "projector") else diffusion if name.startswith("g_nets") else "ode"
        assert role == want, roles
    named = dict(model.named_parameters())
    for name, module in model.named_modules():
        if name.startswith("g_nets") and isinstance(module, nn.Linear):
            changed = not torch.equal(named[name + ".weight"].grad, raw[name + ".weight"])
            assert changed == (sde_type != "ito"), name
    assert not torch.equal(named["f_net.0.weight"].grad, raw["f_net.0.weight"])


def test_natively_solved_sde_layers_are_foreign_and_said_once_with_the_fix():
    """Plain torchsde.sdeint (euler) on a wrapped model stays on torchsde's solver: its layers are
    "foreign", and SNOpt says so once, naming torchsde.sdeint_adjoint and wrap(sde_backprop='adjoint')."""
    torch.manual_seed(4)
    model = snopt_dyn.wrap(LatentSDE("ito").double())
    precond = snopt_dyn.SNOpt(model, update_freq=1, num_samples=4)
    notes = []
    for step in range(2):
        model.zero_grad()
        xs, eps = _latent_data()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(xs, eps, _latent_bm(), adjoint=False, method="euler").backward()
            precond.step()
        notes += [str(w.message) for w in caught if w.category is UserWarning and "SNOpt" in str(w.message)]
    assert len(notes) == 1, notes
    assert "torchsde.sdeint_adjoint" in notes[0] and "sde_backprop='adjoint'" in notes[0]
    assert "'f_net.0'" in notes[0] and "'g_nets.0.0'" in notes[0]
    roles = precond.layers()
    assert roles["f_net.0"]["role"] == "foreign" and roles["projector"]["role"] == "static"


def test_fresh_increments_change_only_the_diffusion_statistics():
    """``sde_noise="fresh"``: drift factors as with the path's ΔW (bit for bit), diffusion factors from
    other increments, the global RNG untouched, and the gradient unchanged."""
    def factors(noise):
        torch.manual_seed(5)
        sde = ToySDE().double()
        precond = snopt_dyn.SNOpt(sde, update_freq=1, num_samples=5, sde_noise=noise)
        ys = snopt_dyn.sdeint_adjoint(sde, torch.randn(B, D, dtype=F64), [0.0, 1.0], bm=_bm(sde),
                                      method="midpoint", dt=0.05)
        state = torch.get_rng_state()
        ys[-1].square().sum(1).mean().backward()
        assert torch.equal(state, torch.get_rng_state())
        grads = [p.grad.clone() for p in sde.parameters()]
        precond.step()
        return precond.factors(), grads

    path, grads_path = factors("path")
    fresh, grads_fresh = factors("fresh")
    for a, b in zip(grads_path, grads_fresh):
        assert torch.equal(a, b)
    for name in ("f_net.0", "f_net.2"):
        assert torch.equal(path[name][0], fresh[name][0]) and torch.equal(path[name][1], fresh[name][1])
    assert torch.equal(path["g_net"][0], fresh["g_net"][0])
    assert not torch.allclose(path["g_net"][1], fresh["g_net"][1])
    with pytest.raises(ValueError, match="sde_noise"):
        snopt_dyn.SNOpt(ToySDE(), sde_noise="random")

"""SNOpt: factors against brute force, the update against the dense formula, robustness, state."""
import copy
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snopt_dyn
from snopt_dyn import hooks

T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)


class MLPField(nn.Module):
    def __init__(self, d=3, h=5, bias=True):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z))) * (1 + 0.5 * torch.sin(t))


class ODEModel(nn.Module):
    """Linear encoder -> ODE (engine adjoint) -> Linear head."""

    def __init__(self, field, d_in=4, d=3, d_out=2, method="dopri5", t=T01):
        super().__init__()
        self.enc, self.field, self.head = nn.Linear(d_in, d), field, nn.Linear(d, d_out)
        self.method, self.t = method, t
        self.stray_calls = False

    def forward(self, x):
        z = self.enc(x)
        if self.stray_calls:  # like torchcde, evaluate the field once outside the solve, with grad
            self.field(self.t[0], z)
        zs = snopt_dyn.odeint_adjoint(self.field, z, self.t, method=self.method, rtol=1e-7, atol=1e-7)
        return self.head(zs[-1])


class Recorder(hooks.EngineObserver):
    """A second observer that keeps the samples the engine delivers (for brute-force checks)."""

    def __init__(self, spec):
        self.spec, self.batches = spec, []

    def sample_spec(self, func):
        return self.spec

    def on_samples(self, func, batch):
        self.batches.append(batch)


def _loss(model, x, y):
    return F.mse_loss(model(x), y)


def _data(n=6, d_in=4, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randn(n, d_out, generator=g, dtype=torch.float64)


def test_ode_factors_match_brute_force():
    torch.manual_seed(0)
    model = ODEModel(MLPField()).double()
    x, y = _data()
    J = 7
    precond = snopt_dyn.SNOpt(model, num_samples=J, update_freq=5)
    rec = Recorder(hooks.SampleSpec(count=J))
    handle = hooks.register_observer(rec)
    _loss(model, x, y).backward()
    handle.remove()
    precond.step()
    (batch,) = rec.batches
    n = x.shape[0]
    l1, l2 = model.field.l1, model.field.l2
    a1 = torch.zeros(4, 4, dtype=torch.float64); g1 = torch.zeros(5, 5, dtype=torch.float64)
    a2 = torch.zeros(6, 6, dtype=torch.float64); g2 = torch.zeros(3, 3, dtype=torch.float64)
    for j in range(J):
        t, z, adj = batch.times[j], batch.states[j], batch.adjoints[j]
        # the field by hand, keeping each layer's input and output
        x1 = z
        y1 = x1 @ l1.weight.T + l1.bias
        x2 = torch.tanh(y1)
        y2 = x2 @ l2.weight.T + l2.bias
        f = y2 * (1 + 0.5 * torch.sin(t))
        gy1, gy2 = torch.autograd.grad(f, (y1, y2), adj)
        ones = torch.ones(n, 1, dtype=torch.float64)
        xb1, xb2 = torch.cat([x1, ones], 1), torch.cat([x2.detach(), ones], 1)
        a1 += xb1.T @ xb1 / n; a2 += xb2.T @ xb2 / n
        s = n * batch.weight
        g1 += (s * gy1).T @ (s * gy1) / n; g2 += (s * gy2).T @ (s * gy2) / n
    factors = precond.factors()
    for name, a, g in (("field.l1", a1 / J, g1 / J), ("field.l2", a2 / J, g2 / J)):
        A, G, mult = factors[name]
        assert mult == J
        torch.testing.assert_close(A, a, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(G, g, rtol=1e-6, atol=1e-10)
    # static layers: ordinary K-FAC from the forward/backward calls
    A, G, mult = factors["enc"]
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(A, xb.T @ xb / n)
    assert mult == 1 and G.shape == (3, 3)


def test_update_equals_dense_formula():
    """One Linear layer: the preconditioned gradient equals (U diag(1/(m2+eps)) Uᵀ) vec(grad)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    damping, alpha = 0.07, 0.6
    precond = snopt_dyn.SNOpt(model, damping=damping, alpha=alpha, update_freq=10, moment="paper")
    F.mse_loss(model(x), y).backward()
    layer = model[0]
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()
    precond.step()
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
    A, G, mult = precond.factors()["0"]
    s_a, u_a = torch.linalg.eigh(A)
    s_g, u_g = torch.linalg.eigh(G)
    n = x.shape[0]
    proj = u_g.T @ grad @ u_a
    m2 = alpha * mult * torch.outer(s_g.clamp_min(0), s_a.clamp_min(0)) + (1 - alpha) * n * proj ** 2
    # dense: vec is column-major, so vec(U_G X U_Aᵀ) = (U_A ⊗ U_G) vec(X)
    basis = torch.kron(u_a, u_g)
    dense = basis @ torch.diag(1 / (m2.T.reshape(-1) + damping)) @ basis.T
    want = (dense @ grad.T.reshape(-1)).reshape(3 + 1, 2).T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_dense_formula_with_true_curvature_inverse():
    """moment="kfac": the update is (mult·A⊗G + damping I)^-1 grad exactly."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 3, bias=False)).double()
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    precond = snopt_dyn.SNOpt(model, damping=0.1, moment="kfac")
    F.mse_loss(model(x), y).backward()
    grad = model[0].weight.grad.clone()
    precond.step()
    A, G, mult = precond.factors()["0"]
    curvature = mult * torch.kron(A, G) + 0.1 * torch.eye(6, dtype=torch.float64)
    want = torch.linalg.solve(curvature, grad.T.reshape(-1)).reshape(2, 3).T
    torch.testing.assert_close(model[0].weight.grad, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_exactly_J_samples_only_on_refresh(method):
    torch.manual_seed(3)
    model = ODEModel(MLPField(), method=method).double()
    model.stray_calls = True
    x, y = _data()
    calls = {"n": 0}
    model.field.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1) if hooks.current_phase() == hooks.SAMPLE else None)
    precond = snopt_dyn.SNOpt(model, num_samples=9, update_freq=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    per_iter = []
    for _ in range(6):
        before = calls["n"]
        opt.zero_grad(); _loss(model, x, y).backward(); precond.step(); opt.step()
        per_iter.append(calls["n"] - before)
    assert per_iter == [9, 0, 0, 9, 0, 0]
    layers = precond.layers()
    assert layers["field.l1"]["role"] == "ode" and layers["field.l1"]["samples"] == 9
    assert layers["enc"]["role"] == "static" and layers["head"]["role"] == "static"
    assert precond.diagnostics()["sampling_nfe"] == 18


def test_sample_step_sets_J():
    model = ODEModel(MLPField(), t=torch.tensor([0.0, 2.0], dtype=torch.float64)).double()
    precond = snopt_dyn.SNOpt(model, sample_step=0.25)
    x, y = _data()
    _loss(model, x, y).backward()
    precond.step()
    assert precond.layers()["field.l2"]["samples"] == 8


class ConvField(nn.Module):
    def __init__(self, conv1d=False):
        super().__init__()
        Conv = nn.Conv1d if conv1d else nn.Conv2d
        self.conv = Conv(2, 2, 3, padding=1, stride=1)

    def forward(self, t, z):
        return torch.tanh(self.conv(z))


@pytest.mark.parametrize("conv1d", [False, True])
def test_conv_factors_against_explicit_im2col(conv1d):
    torch.manual_seed(4)
    field = ConvField(conv1d).double()
    shape = (3, 2, 5) if conv1d else (3, 2, 4, 4)
    z0 = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn(*shape, dtype=torch.float64)
    J = 3
    precond = snopt_dyn.SNOpt(field, num_samples=J)
    rec = Recorder(hooks.SampleSpec(count=J))
    handle = hooks.register_observer(rec)
    out = snopt_dyn.odeint_adjoint(field, z0, T01, rtol=1e-7, atol=1e-7)[-1]
    F.mse_loss(out, target).backward()
    handle.remove()
    precond.step()
    (batch,) = rec.batches
    conv, n = field.conv, shape[0]
    a_sum = torch.zeros(2 * 9 + 1 if not conv1d else 2 * 3 + 1, 2 * 9 + 1 if not conv1d else 2 * 3 + 1, dtype=torch.float64)
    g_sum = torch.zeros(2, 2, dtype=torch.float64)
    for j in range(J):
        z = batch.states[j]
        y = conv(z)
        (gy,) = torch.autograd.grad(torch.tanh(y), y, batch.adjoints[j])
        zp = F.pad(z, (1, 1) if conv1d else (1, 1, 1, 1))
        rows, grows = [], []
        spatial = [range(shape[2])] if conv1d else [range(shape[2]), range(shape[3])]
        for b in range(n):
            if conv1d:
                for i in spatial[0]:
                    rows.append(torch.cat([zp[b, :, i:i + 3].reshape(-1), torch.ones(1, dtype=torch.float64)]))
                    grows.append(gy[b, :, i])
            else:
                for i in spatial[0]:
                    for k in spatial[1]:
                        rows.append(torch.cat([zp[b, :, i:i + 3, k:k + 3].reshape(-1), torch.ones(1, dtype=torch.float64)]))
                        grows.append(gy[b, :, i, k])
        rows, grows = torch.stack(rows), torch.stack(grows) * n * batch.weight
        a_sum += rows.T @ rows / len(rows)
        g_sum += grows.T @ grows / len(grows)
    A, G, mult = precond.factors()["conv"]
    locations = shape[2] if conv1d else shape[2] * shape[3]
    assert mult == J * locations
    torch.testing.assert_close(A, a_sum / J, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(G, g_sum / J, rtol=1e-6, atol=1e-10)


def _train(model, precond, opt, x, y, iters):
    for _ in range(iters):
        opt.zero_grad(); _loss(model, x, y).backward(); precond.step(); opt.step()


def test_checkpoint_round_trip_resumes_identically():
    torch.manual_seed(5)
    x, y = _data(8)
    base = ODEModel(MLPField()).double()

    def make(state=None):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        precond = snopt_dyn.SNOpt(model, update_freq=3, num_samples=4)
        return model, opt, precond

    m1, o1, p1 = make()
    _train(m1, p1, o1, x, y, 8)

    m2, o2, p2 = make()
    _train(m2, p2, o2, x, y, 4)
    ckpt = copy.deepcopy({"model": m2.state_dict(), "opt": o2.state_dict(), "precond": p2.state_dict()})
    m3, o3, p3 = make()
    m3.load_state_dict(ckpt["model"]); o3.load_state_dict(ckpt["opt"]); p3.load_state_dict(ckpt["precond"])
    _train(m3, p3, o3, x, y, 4)
    for a, b in zip(m1.parameters(), m3.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_nan_gradient_leaves_grad_and_state_untouched():
    torch.manual_seed(6)
    x, y = _data()
    model = ODEModel(MLPField()).double()
    precond = snopt_dyn.SNOpt(model, update_freq=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, precond, opt, x, y, 3)
    state = copy.deepcopy(precond.state_dict())
    opt.zero_grad(); _loss(model, x, y).backward()
    model.field.l1.weight.grad[0, 0] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        precond.step()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, equal_nan=True)
    after = precond.state_dict()
    assert after["steps"] == state["steps"]
    for name, s in state["layers"].items():
        for k in ("u_a", "u_g", "m2"):
            torch.testing.assert_close(after["layers"][name][k], s[k])
    precond.raise_on_nonfinite = True
    with pytest.raises(snopt_dyn.NonFiniteError):
        precond.step()


def test_layer_without_samples_warns_once_and_keeps_raw_grad():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.field = MLPField()
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return snopt_dyn.odeint_adjoint(self.field, x, T01, rtol=1e-3, atol=1e-3)[-1]

    model = Model().double()
    precond = snopt_dyn.SNOpt(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x).pow(2).mean().backward()
    model.unused.weight.grad = torch.ones(3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'unused' received no"):
        precond.step()
    assert torch.equal(model.unused.weight.grad, torch.ones(3, 3, dtype=torch.float64))


def test_unsupported_layers_listed_once():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.GRUCell(2, 2))
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm.*2 \(GRUCell"):
        snopt_dyn.SNOpt(model)


def test_static_layers_off_passes_grads_through():
    torch.manual_seed(7)
    model = ODEModel(MLPField()).double()
    precond = snopt_dyn.SNOpt(model, static_layers=False)
    x, y = _data()
    _loss(model, x, y).backward()
    enc = model.enc.weight.grad.clone()
    l1 = model.field.l1.weight.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precond.step()
    assert torch.equal(model.enc.weight.grad, enc)
    assert not torch.allclose(model.field.l1.weight.grad, l1)


def test_hyperparameters_may_be_callables():
    model = nn.Sequential(nn.Linear(2, 2)).double()
    seen = []
    precond = snopt_dyn.SNOpt(model, damping=lambda k: seen.append(k) or 0.1 / (k + 1))
    x = torch.randn(3, 2, dtype=torch.float64)
    for _ in range(3):
        model.zero_grad(); model(x).pow(2).sum().backward(); precond.step()
    assert seen == [0, 1, 2]


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        snopt_dyn.SNOpt(lambda x: x)
    with pytest.raises(ValueError, match="update_freq"):
        snopt_dyn.SNOpt(nn.Linear(1, 1), update_freq=0)
    with pytest.raises(ValueError, match="not both"):
        snopt_dyn.SNOpt(nn.Linear(1, 1), sample_step=0.1, num_samples=3)


@pytest.mark.slow
def test_digits_convergence_beats_sgd_at_same_lr():
    """Neural ODE classifier on sklearn digits: SNOpt+SGD reaches a lower training loss than SGD."""
    from snopt_dyn.datasets import load_digits

    X, Y = load_digits("train", flatten=True)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))

        def forward(self, t, z):
            return self.net(z)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.field, self.head = nn.Linear(64, 16), Field(), nn.Linear(16, 10)

        def forward(self, x):
            return self.head(snopt_dyn.odeint_adjoint(self.field, self.enc(x), torch.tensor([0.0, 1.0]),
                                                      rtol=1e-3, atol=1e-3)[-1])

    def final_loss(seed, use_snopt):
        torch.manual_seed(seed)
        model = Classifier()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        precond = snopt_dyn.SNOpt(model, update_freq=10, num_samples=5) if use_snopt else None
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(60):
            idx = torch.randint(0, len(X), (64,), generator=gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            if precond:
                precond.step()
            opt.step()
            losses.append(loss.item())
        return sum(losses[-10:]) / 10

    sgd = [final_loss(s, False) for s in range(3)]
    snopt = [final_loss(s, True) for s in range(3)]
    print("final training loss  SGD:", sgd, " SNOpt:", snopt)
    assert statistics.median(snopt) < 0.7 * statistics.median(sgd)

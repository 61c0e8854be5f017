"""Invariance tests of SNOpt's curvature: two set-ups with the same per-sample Fisher must give the
same preconditioned gradients, at refresh and at non-refresh steps (float64, tight tolerances).

Each pattern is one that real models use and that the factors once got wrong while every factor
test passed (issue 12): a broadcast time row, unbatched states, tuple part order, sum vs mean
losses, gradient accumulation, an in-place activation after a field layer.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snopt_dyn

T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)
MOMENTS = ["per_sample", "paper"]
SOLVE = dict(method="dopri5", rtol=1e-10, atol=1e-10)


def _solve(field, z0):
    return snopt_dyn.odeint_adjoint(field, z0, T01, **SOLVE)


def _run(model, batches, steps=4, lr=0.05, **kwargs):
    """SGD with SNOpt (refresh every 2 steps); the preconditioned gradients of every step.

    ``batches(step)`` returns the losses to back-propagate before that step (several = accumulation)."""
    kwargs.setdefault("update_freq", 2)
    kwargs.setdefault("num_samples", 5)
    precond = snopt_dyn.SNOpt(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        opt.zero_grad()
        for loss_fn in batches(step):
            loss_fn(model).backward()
        precond.step()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    precond.remove()
    return out


def _assert_same(got, want, factor=1.0, rtol=1e-6):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for name in w:
            err = (g[name] - factor * w[name]).norm() / (factor * w[name]).norm().clamp_min(1e-300)
            assert err < rtol, f"step {step} ({'refresh' if step % 2 == 0 else 'non-refresh'}), {name}: {err:.3g}"


# ------------------------------------------------------------------------ 1. broadcast rows
class TimeField(nn.Module):
    """A time embedding: ``Linear(1, h)`` on a (1, 1) row broadcast over the batch, or on (N, 1)."""

    def __init__(self, expand, d=3, h=6):
        super().__init__()
        self.expand = expand
        self.time, self.l1, self.l2 = nn.Linear(1, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, t, z):
        tt = t.reshape(1, 1).to(z)
        if self.expand:
            tt = tt.expand(z.shape[0], 1)
        return self.l2(torch.tanh(self.l1(z) + self.time(tt)))


class HyperField(nn.Module):
    """A t-hypernetwork (torchdiffeq's examples/cnf.py pattern): W(t) from a (1, 1) row, reshaped,
    or the same computed per sample from an (N, 1) column."""

    def __init__(self, expand, d=3, h=4):
        super().__init__()
        self.expand, self.d = expand, d
        self.hyper1, self.hyper2 = nn.Linear(1, h), nn.Linear(h, d * d)

    def forward(self, t, z):
        tt = t.reshape(1, 1).to(z)
        if not self.expand:
            w = self.hyper2(torch.tanh(self.hyper1(tt))).reshape(self.d, self.d)
            return torch.tanh(z @ w.t())
        w = self.hyper2(torch.tanh(self.hyper1(tt.expand(z.shape[0], 1)))).reshape(-1, self.d, self.d)
        return torch.tanh(torch.einsum("nj,nij->ni", z, w))


def _field_loss(x, y):
    return lambda model: F.mse_loss(_solve(model, x)[-1], y)


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("Field", [TimeField, HyperField])
def test_broadcast_row_equals_expanded_row(Field, moment):
    torch.manual_seed(0)
    base = Field(expand=False).double()
    expanded = Field(expand=True).double()
    expanded.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    got = _run(base, lambda s: [_field_loss(x, y)], moment=moment)
    want = _run(expanded, lambda s: [_field_loss(x, y)], moment=moment)
    _assert_same(got, want)


# ------------------------------------------------------------------------ 2. unbatched states
class MLPField(nn.Module):
    def __init__(self, d=3, h=5):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z))) * (1 + 0.5 * torch.sin(t))


class ConvField(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, t, z):
        return torch.tanh(self.conv(z))


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("shape", [(3,), (2, 4, 4)], ids=["vector", "CHW"])
def test_unbatched_state_equals_batch_of_one(shape, moment):
    torch.manual_seed(2)
    make = MLPField if len(shape) == 1 else ConvField
    a = make().double()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    got = _run(a, lambda s: [_field_loss(x, y)], moment=moment)
    want = _run(b, lambda s: [_field_loss(x[None], y[None])], moment=moment)
    _assert_same(got, want)


# ------------------------------------------------------------------------ 3. tuple part order
class PairField(nn.Module):
    """State ``(z, c)`` or ``(c, z)``: an (N, d) state and a (1, k) accumulator of a batch statistic."""

    def __init__(self, accumulator_first, d=3, h=5):
        super().__init__()
        self.first = accumulator_first
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, t, state):
        c, z = state if self.first else state[::-1]
        dz = self.l2(torch.tanh(self.l1(z)))
        dc = (dz * z).mean(0, keepdim=True)[:, :2]
        return (dc, dz) if self.first else (dz, dc)


@pytest.mark.parametrize("moment", MOMENTS)
def test_tuple_part_order_does_not_matter(moment):
    torch.manual_seed(4)
    a = PairField(accumulator_first=True).double()
    b = PairField(accumulator_first=False).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    c0 = torch.zeros(1, 2, dtype=torch.float64)

    def loss(first):
        def fn(model):
            c, z = _solve(model, (c0, x) if first else (x, c0))
            if not first:
                c, z = z, c
            return F.mse_loss(z[-1], y) + c[-1].pow(2).sum()
        return fn

    got = _run(a, lambda s: [loss(True)], moment=moment)
    want = _run(b, lambda s: [loss(False)], moment=moment)
    _assert_same(got, want)


# ------------------------------------------------------------------------ 4./5. losses & batches
class ODEModel(nn.Module):
    """Linear encoder -> ODE -> Linear head: ODE layers and static (K-FAC) layers."""

    def __init__(self):
        super().__init__()
        self.enc, self.field, self.head = nn.Linear(4, 3), MLPField(), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(_solve(self.field, self.enc(x))[-1])


def _data(n, seed=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("moment", MOMENTS)
def test_sum_loss_is_batch_times_mean_loss_at_every_step(moment):
    """``loss_reduction="sum"`` on the summed loss = B × ``"mean"`` on the mean loss (documented);
    with lr/B the two runs take identical steps, so the ratio is checked at every step."""
    torch.manual_seed(7)
    a = ODEModel().double()
    b = copy.deepcopy(a)
    x, y = _data(8)
    B = x.shape[0]
    got = _run(a, lambda s: [lambda m: F.mse_loss(m(x), y, reduction="sum")], lr=0.05 / B,
               loss_reduction="sum", moment=moment)
    want = _run(b, lambda s: [lambda m: F.mse_loss(m(x), y, reduction="sum") / B], moment=moment)
    _assert_same(got, want, factor=B)


@pytest.mark.parametrize("moment", MOMENTS)
def test_accumulated_micro_batches_equal_one_batch(moment):
    """K=2 micro-batches with loss/K and one step() == one batch of twice the size."""
    torch.manual_seed(8)
    a = ODEModel().double()
    b = copy.deepcopy(a)
    x, y = _data(12)
    halves = [(x[:6], y[:6]), (x[6:], y[6:])]
    got = _run(a, lambda s: [lambda m, xb=xb, yb=yb: F.mse_loss(m(xb), yb) / 2 for xb, yb in halves],
               moment=moment)
    want = _run(b, lambda s: [lambda m: F.mse_loss(m(x), y)], moment=moment)
    _assert_same(got, want)


# ------------------------------------------------------------------------ 6. in-place ops
class ELUField(nn.Module):
    def __init__(self, inplace, d=3, h=5):
        super().__init__()
        self.inplace = inplace
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, t, z):
        return self.l2(F.elu(self.l1(z), inplace=self.inplace))


@pytest.mark.parametrize("moment", MOMENTS)
def test_inplace_activation_after_a_field_layer(moment):
    torch.manual_seed(9)
    a = ELUField(inplace=True).double()
    b = ELUField(inplace=False).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    got = _run(a, lambda s: [_field_loss(x, y)], moment=moment)
    want = _run(b, lambda s: [_field_loss(x, y)], moment=moment)
    _assert_same(got, want, rtol=1e-5)  # the two ELU backward formulas differ by rounding (1e-9 at step 0)


# ------------------------------------------------------------------------ autograd inside the field
class Recorder(snopt_dyn.hooks.EngineObserver):
    """Keeps the samples the engine delivers (the same times as SNOpt's)."""

    def __init__(self, count):
        self.spec, self.batches = snopt_dyn.hooks.SampleSpec(count=count), []

    def sample_spec(self, func):
        return self.spec

    def on_samples(self, func, batch):
        self.batches.append(batch)


class EnergyField(nn.Module):
    """torchdyn's HNN pattern: the value is the symplectic gradient of an energy network."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, t, x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            dh = torch.autograd.grad(self.net(x).sum(), x, create_graph=torch.is_grad_enabled())[0]
        return torch.cat([dh[:, 1:], -dh[:, :1]], 1)


def _cnf_field(trace):
    from snopt_dyn.models.cnf import CNFField
    return CNFField(2, hidden=(6,), trace=trace)


def _true_sampled_gradient(field, batch, layer):
    """``Σ_j w_j ∂(a_jᵀ f(t_j, z_j))/∂[W | b]`` by autograd through the whole field."""
    total = 0
    for j in range(len(batch.times)):
        state = tuple(s[j] for s in batch.states) if isinstance(batch.states, tuple) else batch.states[j]
        adj = tuple(a[j] for a in batch.adjoints) if isinstance(batch.adjoints, tuple) else (batch.adjoints[j],)
        with torch.enable_grad():
            out = field(batch.times[j], state)
            outs = out if isinstance(out, tuple) else (out,)
            params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
            grads = torch.autograd.grad(outs, params, adj, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        total = total + batch.weights[j] * torch.cat([grads[0], *(g[:, None] for g in grads[1:])], 1)
    return total


@pytest.mark.parametrize("autograd_uses", [True, False])
@pytest.mark.parametrize("case", ["cnf-exact", "cnf-hutchinson", "energy"])
def test_autograd_uses_make_per_sample_gradients_exact(case, autograd_uses):
    """With ``autograd_uses`` the per-sample gradients SNOpt pairs from a field that takes
    ``autograd.grad`` inside (CNF trace, energy field) sum to the true gradient of the sampled
    objective; from the forward calls alone they miss the trace/energy-gradient part."""
    torch.manual_seed(11)
    n, J = 6, 3
    if case == "energy":
        field = EnergyField().double()
        state, layers = torch.randn(n, 2, dtype=torch.float64), [field.net[0], field.net[2]]
    else:
        field = _cnf_field(case.split("-")[1]).double()
        x = torch.randn(n, 2, dtype=torch.float64)
        field.draw_noise(x)
        state, layers = (x, torch.zeros(n, 1, dtype=torch.float64)), [m for m in field.modules() if isinstance(m, nn.Linear)]
    precond = snopt_dyn.SNOpt(field, num_samples=J, moment="per_sample", autograd_uses=autograd_uses)
    rec = Recorder(J)
    handle = snopt_dyn.hooks.register_observer(rec)
    out = snopt_dyn.odeint_adjoint(field, state, T01, method="rk4", options={"step_size": 0.25})
    parts = out if isinstance(out, tuple) else (out,)
    sum(p[-1].pow(2).mean() + p[-1].sum() for p in parts).backward()
    handle.remove()
    (batch,) = rec.batches
    errors = []
    for layer in layers:
        stats = precond._layers[layer].ode
        got = sum(p.sum(0) for p in stats.per_sample.values()) / n  # per-sample scale: N · the mean's
        want = _true_sampled_gradient(field, batch, layer)
        errors.append(float((got - want).norm() / want.norm()))
    print(f"{case} autograd_uses={autograd_uses}: relative error of the paired gradient per layer", errors)
    if autograd_uses:
        assert max(errors) < 1e-8, errors
    else:
        assert max(errors) > 0.05, errors
    precond.remove()


# ------------------------------------------------------------------------ 3b. explicit batch size
class ScalarField(nn.Module):
    """N scalar ODEs: the state is ``(N,)`` (which the batch rule reads as one unbatched vector)
    or ``(N, 1)``; the field treats each entry as one sample."""

    def __init__(self, h=5):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, h), nn.Linear(h, 1)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z.reshape(-1, 1)))).reshape(z.shape)


@pytest.mark.parametrize("moment", MOMENTS)
def test_explicit_batch_size_where_the_rule_cannot_see_it(moment):
    torch.manual_seed(12)
    a = ScalarField().double()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    got = _run(a, lambda s: [_field_loss(x, y)], moment=moment, batch_size=8)
    want = _run(b, lambda s: [_field_loss(x[:, None], y[:, None])], moment=moment)
    _assert_same(got, want)

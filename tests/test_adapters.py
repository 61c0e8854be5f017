"""snopt_dyn.wrap on real torchdyn / torchcde / torchdiffeq / latent-ODE models (no mocks).

This module plays the part of user code: its classes call ``torchcde.cdeint``, ``cdeint`` (imported
name), ``torchdiffeq`` and ``odeint`` (``from torchdiffeq import odeint_adjoint as odeint``), so
``wrap`` must patch both the library attributes and this module's globals -- and put them back.
"""
from __future__ import annotations

import io
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn
from torchdiffeq import odeint_adjoint as odeint

import snopt_dyn
import snopt_dyn.models.latent_ode as latent_ode_module
from snopt_dyn.models import LatentODE, ODERNN

torchcde = pytest.importorskip("torchcde")
pytest.importorskip("torchdyn")
from torchcde import cdeint  # noqa: E402
from torchdyn.core import NeuralODE  # noqa: E402
from torchdyn.nn import Augmenter, DataControl, DepthCat  # noqa: E402

# Kept in a dict: wrap swaps every *global name* bound to torchdiffeq's functions in user modules
# (this module is one) while a wrapped forward runs.
_ORIG = {"odeint": torchdiffeq.odeint, "odeint_adjoint": torchdiffeq.odeint_adjoint, "cdeint": torchcde.cdeint}
DT = torch.float64


# ----------------------------------------------------------------------------------------- helpers
def grads(model: nn.Module):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def clone(model: nn.Module) -> nn.Module:
    """An independent copy (torchdyn's NeuralODE does not support copy.deepcopy: it keeps a non-leaf
    ``vf_params`` tensor; pickling works)."""
    return pickle.loads(pickle.dumps(model))


def max_diff(a, b) -> float:
    """Largest difference between two lists of tensors, relative to the largest entry (at least 1)."""
    scale = max(1.0, max(float(y.abs().max()) for y in b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


class _Plain(nn.Module):
    """A field nobody wrapped: every solve of it must run torchdiffeq's own solver."""

    def forward(self, t, y):
        return -y


def assert_no_patches():
    """Interception leaves no state behind: solver names are torchdiffeq's functions or the
    stand-ins (nothing else), no engine phase is left open, and an unwrapped field still runs on
    torchdiffeq with its numbers."""
    from snopt_dyn.adapters import torchdiffeq as adapter
    from snopt_dyn import hooks

    g = globals()
    for name, value in (("odeint", torchdiffeq.odeint), ("odeint_adjoint", torchdiffeq.odeint_adjoint),
                        ("odeint", latent_ode_module.odeint), ("odeint_adjoint", latent_ode_module.odeint_adjoint),
                        ("odeint_adjoint", g["odeint"])):
        assert value is _ORIG[name] or value is adapter.REPLACEMENTS[name], (name, value)
    assert g["cdeint"] is _ORIG["cdeint"] and torchcde.cdeint is _ORIG["cdeint"]
    assert hooks.current_phase() == hooks.OUTSIDE
    before = snopt_dyn.nfe.total
    y0, t = torch.ones(2, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    out = torchdiffeq.odeint(_Plain(), y0, t)
    assert snopt_dyn.nfe.total == before
    assert torch.equal(out, _ORIG["odeint"](_Plain(), y0, t))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class Last(nn.Module):
    """Keeps the final time of a time-first solution (for NeuralODE inside nn.Sequential)."""

    def forward(self, sol):
        return sol[-1]


def mlp(d_in, d_out, width=16):
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out))


def make_node(field, **kw):
    return quiet(NeuralODE, field, **kw)


class NODEClassifier(nn.Module):
    """A user module holding a NeuralODE (time-dependent field via DepthCat) as an attribute."""

    def __init__(self, solver="tsit5", tol=1e-3):
        super().__init__()
        self.node = make_node(nn.Sequential(DepthCat(1), nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)),
                              solver=solver, sensitivity="adjoint", atol=tol, rtol=tol, atol_adjoint=tol,
                              rtol_adjoint=tol)
        self.head = nn.Linear(2, 3)

    def forward(self, x, t_span=None):
        _, sol = self.node(x, t_span if t_span is not None else torch.linspace(0, 1, 2, dtype=x.dtype))
        return self.head(sol[-1])


class MyNeuralODE(NeuralODE):
    """A user subclass of NeuralODE (wrap must keep it picklable and its class hierarchy)."""

    def forward(self, x, t_span=None):
        t_eval, sol = super().forward(x, t_span)
        return sol[-1]


# ------------------------------------------------------------------------------- torchcde models
class CDEFunc(nn.Module):
    """The canonical Neural CDE field: an MLP ending in a Linear reshaped to (hidden, channels).

    Smooth activations (tanh) so that solver-tolerance comparisons are meaningful (a ReLU makes the
    dynamics kinked and every method's gradient converges slowly)."""

    def __init__(self, channels, hidden, width=16):
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.l1 = nn.Linear(hidden, width)
        self.l2 = nn.Linear(width, hidden * channels)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z))).view(*z.shape[:-1], self.hidden, self.channels)


class NeuralCDE(nn.Module):
    """Initial Linear -> cdeint over X.interval -> read-out of the final state (``torchcde.cdeint``).

    ``jump_t`` at the knots (torchcde's advice for linear interpolation): the field's dependence on
    the spline pieces changes there, and adaptive steps that straddle a knot lose accuracy."""

    def __init__(self, channels, hidden, out, interpolation="cubic", adjoint=True, tol=1e-3):
        super().__init__()
        self.initial = nn.Linear(channels, hidden)
        self.func = CDEFunc(channels, hidden)
        self.readout = nn.Linear(hidden, out)
        self.interpolation, self.adjoint, self.tol = interpolation, adjoint, tol

    def path(self, coeffs):
        if self.interpolation == "linear":
            return torchcde.LinearInterpolation(coeffs)
        return torchcde.CubicSpline(coeffs)  # natural cubic and Hermite coefficients both use CubicSpline

    def solve(self, X, z0):
        return torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=self.adjoint,
                               atol=self.tol, rtol=self.tol, method="dopri5", options=dict(jump_t=X.grid_points))

    def forward(self, coeffs):
        X = self.path(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        return self.readout(self.solve(X, z0)[:, -1])


class NeuralCDEImported(NeuralCDE):
    """Same model, written with ``from torchcde import cdeint``."""

    def solve(self, X, z0):
        return cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=self.adjoint,
                      atol=self.tol, rtol=self.tol, method="dopri5", options=dict(jump_t=X.grid_points))


def cde_coeffs(kind, n=6, length=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length, dtype=DT)
    x = torch.randn(n, length, channels - 1, generator=g, dtype=DT).cumsum(1) * 0.3
    x = torch.cat([t.expand(n, length).unsqueeze(-1), x], -1)
    if kind == "cubic":
        return torchcde.natural_cubic_coeffs(x)
    if kind == "hermite":
        return torchcde.hermite_cubic_coefficients_with_backward_differences(x)
    return torchcde.linear_interpolation_coeffs(x)


# --------------------------------------------------------------------- a user torchdiffeq model
class UserField(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, 16), nn.Linear(16, dim)

    def forward(self, t, y):
        return self.lin2(torch.tanh(self.lin1(y))) - 0.1 * y


class UserODEModel(nn.Module):
    """Written with ``from torchdiffeq import odeint_adjoint as odeint`` (the imported-name style)."""

    def __init__(self, dim=3, classes=2, tol=1e-3, adjoint_options=None):
        super().__init__()
        self.field = UserField(dim)
        self.out = nn.Linear(dim, classes)
        self.tol, self.adjoint_options = tol, adjoint_options
        self.t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)

    def forward(self, x):
        ys = odeint(self.field, x, self.t.to(x), rtol=self.tol, atol=self.tol, adjoint_options=self.adjoint_options)
        return self.out(ys[-1] + ys[1])


# ------------------------------------------------------------------------------------- families
class Family:
    """A model family: how to build one, a batch, and a scalar loss."""

    def __init__(self, name, build, batch, loss, bad_input, vf_linears):
        self.name, self.build, self.batch, self.loss = name, build, batch, loss
        self.bad_input, self.vf_linears = bad_input, vf_linears


def _xy(n=8, d=2, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _ts_batch(n=6, length=5, channels=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, length, channels, generator=g, dtype=DT)
    times = torch.sort(torch.rand(n, length, generator=g, dtype=DT) * 2, dim=1).values
    mask = torch.rand(n, length, generator=g) > 0.2
    return values, times, mask, torch.randint(0, classes, (n,), generator=g)


def _build_alone(tol=1e-3):
    torch.manual_seed(0)
    return make_node(mlp(2, 2), solver="tsit5", sensitivity="adjoint", atol=tol, rtol=tol,
                     atol_adjoint=tol, rtol_adjoint=tol).to(DT)


def _build_sequential(tol=1e-3):
    torch.manual_seed(0)
    return nn.Sequential(Augmenter(1, 2), make_node(mlp(4, 4), solver="dopri5", return_t_eval=False,
                                                     atol=tol, rtol=tol), Last(), nn.Linear(4, 3)).to(DT)


def _build_datacontrol(tol=1e-3):
    torch.manual_seed(0)
    field = nn.Sequential(DataControl(), nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    return make_node(field, solver="dopri5", sensitivity="adjoint", atol=tol, rtol=tol, atol_adjoint=tol,
                     rtol_adjoint=tol).to(DT)


def _build_fixed():
    torch.manual_seed(0)
    return make_node(mlp(2, 2), solver="rk4", sensitivity="autograd").to(DT)


FIXED_GRID = torch.linspace(0, 1, 11, dtype=DT)
TS = _ts_batch()


def _node_loss(m, b):
    _, sol = m(b[0], torch.linspace(0, 1, 2, dtype=DT))
    return (sol[-1] ** 2).mean()


FAMILIES = [
    Family("torchdyn_alone", _build_alone, _xy(), _node_loss, torch.randn(4, 5, dtype=DT),
           ["vf.vf.vf.0", "vf.vf.vf.2"]),
    Family("torchdyn_sequential", _build_sequential, _xy(), lambda m, b: _ce(m(b[0]), b[1]),
           torch.randn(4, 5, dtype=DT), ["1.vf.vf.vf.0", "1.vf.vf.vf.2"]),
    Family("torchdyn_attribute_depthcat", lambda: (torch.manual_seed(0), NODEClassifier().to(DT))[1], _xy(),
           lambda m, b: _ce(m(b[0]), b[1]), torch.randn(4, 5, dtype=DT), ["node.vf.vf.vf.1", "node.vf.vf.vf.3"]),
    Family("torchdyn_datacontrol", _build_datacontrol, _xy(), _node_loss, torch.randn(4, 5, dtype=DT),
           ["vf.vf.vf.1", "vf.vf.vf.3"]),
    Family("torchdyn_fixed_rk4", _build_fixed, _xy(), lambda m, b: (m(b[0], FIXED_GRID)[1][-1] ** 2).mean(),
           torch.randn(4, 5, dtype=DT), ["vf.vf.vf.0", "vf.vf.vf.2"]),
    Family("torchcde_cubic_adjoint", lambda: (torch.manual_seed(0), NeuralCDE(3, 4, 2).to(DT))[1],
           (cde_coeffs("cubic"), torch.randint(0, 2, (6,))), lambda m, b: _ce(m(b[0]), b[1]),
           torch.randn(6, 28, 5, dtype=DT), ["func.l1", "func.l2"]),
    Family("torchcde_hermite_noadjoint_imported",
           lambda: (torch.manual_seed(0), NeuralCDEImported(3, 4, 2, "hermite", adjoint=False).to(DT))[1],
           (cde_coeffs("hermite"), torch.randint(0, 2, (6,))), lambda m, b: _ce(m(b[0]), b[1]),
           torch.randn(6, 28, 5, dtype=DT), ["func.l1", "func.l2"]),
    Family("torchcde_linear_adjoint_imported",
           lambda: (torch.manual_seed(0), NeuralCDEImported(3, 4, 2, "linear").to(DT))[1],
           (cde_coeffs("linear"), torch.randint(0, 2, (6,))), lambda m, b: _ce(m(b[0]), b[1]),
           torch.randn(6, 28, 5, dtype=DT), ["func.l1", "func.l2"]),
    Family("latent_ode", lambda: (torch.manual_seed(0), LatentODE(3, latent_dim=3, rnn_hidden=8, ode_hidden=8,
                                                                  dec_hidden=8).to(DT))[1],
           (TS[0], torch.linspace(0, 1, 5, dtype=DT)),
           lambda m, b: m.elbo(b[0], b[1], generator=torch.Generator().manual_seed(1)),
           torch.randn(6, 5, 7, dtype=DT), ["func.net.0", "func.net.2", "func.net.4"]),
    Family("odernn", lambda: (torch.manual_seed(0), ODERNN(3, 6, 4, width=8).to(DT))[1], TS,
           lambda m, b: _ce(m(b[0], b[1], b[2]), b[3]), torch.randn(6, 5, 7, dtype=DT), ["func.net.0", "func.net.2"]),
    Family("user_torchdiffeq_imported_name", lambda: (torch.manual_seed(0), UserODEModel().to(DT))[1],
           _xy(d=3, classes=2), lambda m, b: _ce(m(b[0]), b[1]), torch.randn(4, 5, dtype=DT),
           ["field.lin1", "field.lin2"]),
]
IDS = [f.name for f in FAMILIES]


def _call_bad(family, model):
    if family.name.startswith("torchcde"):
        return model(family.bad_input)
    if family.name == "latent_ode":
        return model(family.bad_input, torch.linspace(0, 1, 4, dtype=DT))
    if family.name == "odernn":
        return model(family.bad_input, TS[1], TS[2])
    return family.loss(model, (family.bad_input,))


# ------------------------------------------------------------------------- generic guarantees
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_engine_runs_and_no_copies(family):
    model = family.build()
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert snopt_dyn.wrap(model) is model
    assert snopt_dyn.wrap(model) is model  # idempotent
    assert all(p is q for p, q in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys
    assert len(model._forward_pre_hooks) <= 1 and len(model._forward_hooks) <= 1  # hooks not doubled
    snopt_dyn.nfe.reset()
    loss = family.loss(model, family.batch)
    assert snopt_dyn.nfe.forward > 0, "the forward solve did not go through the engine"
    loss.backward()
    assert snopt_dyn.nfe.backward > 0, "the gradient did not come from the engine adjoint"
    assert_no_patches()
    before = [p.detach().clone() for p in params]
    opt.step()  # the optimizer made before wrap updates the same tensors
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_pickle_and_state_dict_round_trip(family):
    model = family.build()
    ref = clone(model)
    snopt_dyn.wrap(model)
    copied = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ref.load_state_dict(model.state_dict())  # an unwrapped model takes the wrapped one's checkpoint
    model.load_state_dict(ref.state_dict())  # and vice versa
    with torch.no_grad():
        out = family.loss(model, family.batch)
        snopt_dyn.nfe.reset()
        for m in (copied, loaded):
            assert torch.allclose(family.loss(m, family.batch), out, rtol=1e-9, atol=1e-12)
        assert snopt_dyn.nfe.forward > 0  # the copies are still wrapped
        assert torch.allclose(family.loss(ref, family.batch), out, rtol=1e-5, atol=1e-7)
    assert_no_patches()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_no_patch_remains_after_forward_raises(family):
    model = snopt_dyn.wrap(family.build())
    with pytest.raises(Exception):
        _call_bad(family, model)
    assert_no_patches()
    family.loss(model, family.batch).backward()  # still works afterwards
    assert_no_patches()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_training_reduces_loss(family):
    model = snopt_dyn.wrap(family.build())
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = family.loss(model, family.batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_snopt_finds_vector_field_layers(family):
    model = snopt_dyn.wrap(family.build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported layer kinds (GRU) are reported by a warning
        precond = snopt_dyn.SNOpt(model, update_freq=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        family.loss(model, family.batch).backward()
        precond.step()
        opt.step()
    layers = precond.layers()
    factors = precond.factors()
    for name in family.vf_linears:
        assert layers[name]["role"] == "ode", (name, layers[name])
        assert layers[name]["samples"] > 0
        a, g, mult = factors[name]
        assert a.numel() > 0 and g.numel() > 0 and mult > 0 and float(a.abs().sum()) > 0 and float(g.abs().sum()) > 0
    precond.remove()


# -------------------------------------------------------------- same numbers: torchdyn
TIGHT = 1e-9


def _node_run(node, x, t_span):
    node.zero_grad()
    x = x.clone().requires_grad_(True)
    t_span = t_span.clone().requires_grad_(True)
    t_eval, sol = node(x, t_span)
    loss = (sol[-1] ** 2).sum() + (sol[-1, :, 0] ** 3).sum()
    loss.backward()
    return sol.detach(), grads(node), x.grad, t_span.grad


@pytest.mark.parametrize("build", [_build_alone, _build_datacontrol], ids=["mlp_tsit5", "datacontrol_dopri5"])
def test_torchdyn_matches_native_adjoint(build):
    native = build(TIGHT)
    autograd_ref = clone(native)
    autograd_ref.sensitivity = autograd_ref.sensalg = autograd_ref.vf.sensitivity = "autograd"
    wrapped = snopt_dyn.wrap(clone(native))
    x, t_span = _xy()[0], torch.tensor([0.0, 1.0], dtype=DT)
    s_nat, g_nat, x_nat, _ = _node_run(native, x, t_span)
    s_ag, _, _, t_ag = _node_run(autograd_ref, x, t_span)
    s_w, g_w, x_w, t_w = _node_run(wrapped, x, t_span)
    assert float((s_nat - s_w).abs().max()) < 1e-7  # tableau from float32 coefficients in torchdyn
    assert max_diff(g_nat, g_w) < 1e-6 and float((x_nat - x_w).abs().max()) < 1e-6
    # time gradients: torchdyn's adjoint gets dL/dt0 wrong, so compare with backprop through the solver
    assert torch.allclose(t_w, t_ag, rtol=1e-6, atol=1e-6)


def test_torchdyn_time_gradients_and_longer_t_span():
    """Several output times with grad (torchdyn's own adjoint raises here); reference: autograd."""
    model = NODEClassifier(tol=TIGHT).to(DT)
    ref = clone(model)
    ref.node.sensitivity = ref.node.sensalg = ref.node.vf.sensitivity = "autograd"
    snopt_dyn.wrap(model)
    x, y = _xy()
    t_span = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=DT)
    out = []
    for m in (ref, model):
        m.zero_grad()
        t = t_span.clone().requires_grad_(True)
        _, sol = m.node(x, t)  # DepthCat: a time-dependent field
        loss = _ce(m.head(sol[-1]), y) + (sol[1] ** 2).mean()
        loss.backward()
        out.append((sol.detach(), grads(m), t.grad))
    (s0, g0, t0), (s1, g1, t1) = out
    assert float((s0 - s1).abs().max()) < 1e-7
    assert max_diff(g0, g1) < 1e-6
    assert float((t0[[0, 1, 3]] - t1[[0, 1, 3]]).abs().max()) < 1e-6
    # t[2] does not enter the loss; a continuous-time gradient is exactly 0 there, autograd's is ~0.
    assert abs(float(t1[2])) < 1e-12 and abs(float(t0[2])) < 1e-6


def test_torchdyn_fixed_step_grid_and_sequential():
    """rk4: t_span is the step grid (forward identical to torchdyn); gradients agree to O(h^4)."""
    native = _build_fixed()
    wrapped = snopt_dyn.wrap(clone(native))
    x = _xy()[0]
    grid = torch.linspace(0, 1, 21, dtype=DT)
    s0, g0, _, _ = _node_run(native, x, grid)
    s1, g1, _, _ = _node_run(wrapped, x, grid)
    assert s1.shape == (21, 8, 2)
    assert float((s0 - s1).abs().max()) < 1e-7
    assert max_diff(g0, g1) < 1e-4
    t_eval, _ = wrapped(x, grid)
    assert torch.equal(t_eval, grid)
    # save_at with a fixed-step solver keeps torchdyn's semantics
    t_eval, sol = wrapped.odeint(x, grid, save_at=grid[::5])
    assert torch.equal(t_eval, grid[::5]) and torch.allclose(sol, s1[::5], atol=1e-12)
    # Sequential with return_t_eval=False: the same numbers as unwrapped
    seq = _build_sequential(TIGHT)
    ref = clone(seq)
    snopt_dyn.wrap(seq)
    assert torch.allclose(seq(x), ref(x), atol=1e-7)


def test_torchdyn_user_subclass_and_trajectory():
    torch.manual_seed(0)
    node = quiet(MyNeuralODE, mlp(2, 2), solver="dopri5", atol=TIGHT, rtol=TIGHT).to(DT)
    ref = clone(node)
    snopt_dyn.wrap(node)
    assert isinstance(node, MyNeuralODE) and isinstance(node, NeuralODE)
    x = _xy()[0]
    t_span = torch.linspace(0, 1, 2, dtype=DT)
    assert torch.allclose(node(x, t_span), ref(x, t_span), atol=1e-7)
    copied = pickle.loads(pickle.dumps(node))
    assert type(copied) is type(node) and torch.allclose(copied(x, t_span), node(x, t_span), atol=1e-12)
    # a fresh process has not created the engine subclass yet: the adapter module recreates it by name
    import snopt_dyn.adapters.torchdyn as adapter
    name = type(node).__name__
    payload = pickle.dumps(node)
    cached = vars(adapter).pop(name)
    try:
        fresh = pickle.loads(payload)
        assert type(fresh).__name__ == name and type(fresh) is not cached and isinstance(fresh, MyNeuralODE)
        assert torch.allclose(fresh(x, t_span), node(x, t_span), atol=1e-12)
    finally:
        vars(adapter)[name] = cached
    snopt_dyn.nfe.reset()
    traj = node.trajectory(x, torch.linspace(0, 1, 5, dtype=DT))
    assert traj.shape == (5, 8, 2) and snopt_dyn.nfe.forward > 0
    assert torch.allclose(traj, ref.trajectory(x, torch.linspace(0, 1, 5, dtype=DT)), atol=1e-7)


# -------------------------------------------------------------- same numbers: torchcde
CDE_TOL = 1e-7  # a CDE's adjoint solve is ~10x its forward: keep it fast


@pytest.mark.parametrize("cls", [NeuralCDE, NeuralCDEImported], ids=["torchcde.cdeint", "imported_cdeint"])
@pytest.mark.parametrize("kind", ["cubic", "hermite", "linear"])
@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_torchcde_matches_native(cls, kind, adjoint):
    torch.manual_seed(0)
    model = cls(3, 4, 2, kind, adjoint=adjoint, tol=CDE_TOL).to(DT)
    native = clone(model)
    native.adjoint = True  # reference gradients: torchdiffeq's own adjoint
    unwrapped = clone(model)
    snopt_dyn.wrap(model)
    coeffs = cde_coeffs(kind)
    y = torch.randint(0, 2, (6,))
    out = []
    for m in (native, unwrapped, model):
        m.zero_grad()
        pred = m(coeffs)
        _ce(pred, y).backward()
        out.append((pred.detach(), grads(m)))
    assert float((out[1][0] - out[2][0]).abs().max()) < 1e-10  # same forward solve
    assert max_diff(out[0][1], out[2][1]) < 1e-6  # gradients vs the native adjoint
    assert_no_patches()


def test_torchcde_coefficient_gradients_reach_the_engine():
    """torchcde passes the spline coefficients in adjoint_params; they must get gradients."""
    torch.manual_seed(0)
    model = NeuralCDE(3, 4, 2, tol=CDE_TOL).to(DT)
    native = clone(model)

    def solve(self, X, z0):
        return torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, atol=CDE_TOL, rtol=CDE_TOL,
                               options=dict(jump_t=X.grid_points),
                               adjoint_params=tuple(self.func.parameters()) + (self._coeffs,))

    res = []
    for m in (native, snopt_dyn.wrap(model)):
        coeffs = cde_coeffs("cubic").requires_grad_(True)
        m._coeffs = coeffs
        m.solve = solve.__get__(m)
        m(coeffs).sum().backward()
        res.append(coeffs.grad)
        del m.solve, m._coeffs
    assert float(res[1].abs().max()) > 0
    assert torch.allclose(res[0], res[1], atol=1e-6)


# -------------------------------------------------------------- same numbers: latent ODE family
def test_latent_ode_matches_native():
    torch.manual_seed(0)
    model = LatentODE(3, latent_dim=3, rnn_hidden=8, ode_hidden=8, dec_hidden=8, rtol=1e-9, atol=1e-9).to(DT)
    backprop, native = clone(model), clone(model)
    native.adjoint = True
    snopt_dyn.wrap(model)
    x, t = TS[0], torch.linspace(0, 1, 5, dtype=DT)
    out = []
    for m in (backprop, native, model):
        m.zero_grad()
        loss = m.elbo(x, t, generator=torch.Generator().manual_seed(3))
        loss.backward()
        out.append((loss.detach(), grads(m)))
    assert abs(float(out[0][0] - out[2][0])) < 1e-10
    assert max_diff(out[1][1], out[2][1]) < 1e-6
    assert max_diff(out[0][1], out[2][1]) < 1e-6
    model.eval()
    pred, mean, _ = model(x, t)
    assert pred.shape == x.shape and torch.allclose(pred, model(x, t)[0])  # eval: z0 = mean


@pytest.mark.parametrize("adjoint", [True, False])
def test_odernn_matches_native(adjoint):
    torch.manual_seed(0)
    model = ODERNN(3, 6, 4, width=8, rtol=1e-9, atol=1e-9, adjoint=adjoint).to(DT)
    native = clone(model)
    native.adjoint = True
    snopt_dyn.wrap(model)
    values, times, mask, y = TS
    values = values.clone()
    values[0, 1, 0] = float("nan")  # a missing channel
    out = []
    for m, tt in ((native, times), (model, times), (native, times[0]), (model, times[0])):
        m.zero_grad()
        logits = m(values, tt, mask)
        _ce(logits, y).backward()
        out.append((logits.detach(), grads(m)))
    for a, b in ((out[0], out[1]), (out[2], out[3])):
        assert torch.isfinite(a[0]).all()
        assert float((a[0] - b[0]).abs().max()) < 1e-10
        assert max_diff(a[1], b[1]) < 1e-6
    assert_no_patches()


@pytest.mark.parametrize("adjoint_options", [None, {"norm": "seminorm"}])
def test_user_torchdiffeq_model_matches_native(adjoint_options):
    torch.manual_seed(0)
    model = UserODEModel(tol=1e-9, adjoint_options=adjoint_options).to(DT)
    native = clone(model)
    snopt_dyn.wrap(model)
    x, y = _xy(d=3, classes=2)
    out = []
    for m in (native, model):
        m.zero_grad()
        xx = x.clone().requires_grad_(True)
        pred = m(xx)
        _ce(pred, y).backward()
        out.append((pred.detach(), grads(m) + [xx.grad]))
    assert float((out[0][0] - out[1][0]).abs().max()) < 1e-10
    assert max_diff(out[0][1], out[1][1]) < 1e-6


# -------------------------------------------------------------- interception rules
class FunctionFieldModel(nn.Module):
    """Calls torchdiffeq.odeint with a plain function (closing over a parameter)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.5, dtype=DT))

    def forward(self, x):
        return torchdiffeq.odeint(lambda t, y: self.a * y, x, torch.tensor([0.0, 1.0], dtype=DT))[-1]


def test_plain_function_falls_back_with_one_warning(monkeypatch):
    import snopt_dyn.adapters.torchdiffeq as adapter

    monkeypatch.setattr(adapter, "_warned", set())  # once per process: forget earlier tests' warnings
    model = snopt_dyn.wrap(FunctionFieldModel())
    x = torch.ones(3, dtype=DT)
    snopt_dyn.nfe.reset()
    with pytest.warns(RuntimeWarning, match="plain function"):
        out = model(x)
    out.sum().backward()
    assert snopt_dyn.nfe.total == 0  # the original solver ran
    assert torch.allclose(out, torch.exp(torch.tensor(-0.5, dtype=DT)) * x, atol=1e-6)
    assert model.a.grad is not None
    assert_no_patches()


class EventModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = UserField(2)

    def forward(self, x):
        return odeint(self.f, x, torch.tensor([0.0, 1.0], dtype=DT), event_fn=lambda t, y: y.sum())


def test_event_fn_not_implemented_and_restored():
    model = snopt_dyn.wrap(EventModel().to(DT))
    with pytest.raises(NotImplementedError, match="event_fn"):
        model(torch.ones(1, 2, dtype=DT))
    assert_no_patches()


def test_routing_is_by_field_identity_on_every_thread_and_nested_models():
    """A solve of a wrapped module runs on the engine from any thread; an unwrapped one never does.
    A wrapped model inside another wrapped model takes the options of the last wrap."""
    inner = snopt_dyn.wrap(UserODEModel().to(DT), seminorm=False)
    plain = UserField(3).to(DT)
    x, t = _xy(d=3)[0], torch.tensor([0.0, 1.0], dtype=DT)
    seen = {}

    def other_thread():
        for name, f in (("wrapped", inner.field), ("plain", plain)):
            before = snopt_dyn.nfe.total
            seen[name] = (torchdiffeq.odeint(f, x, t), snopt_dyn.nfe.total - before)

    th = threading.Thread(target=other_thread)
    th.start()
    th.join()
    assert seen["wrapped"][1] > 0 and seen["plain"][1] == 0
    assert torch.equal(seen["plain"][0], _ORIG["odeint"](plain, x, t))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    snopt_dyn.wrap(Outer(), seminorm=True)
    assert inner.field._snopt_route.options.seminorm is True
    assert_no_patches()


# -------------------------------------------------------------- errors and options
def test_wrap_errors_list_what_is_supported():
    with pytest.raises(ValueError, match="torchdyn NeuralODE.*torchcde.cdeint.*torchdiffeq.odeint"):
        snopt_dyn.wrap(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="NeuralODE.*cdeint.*snopt_dyn.odeint_adjoint"):
        snopt_dyn.wrap(lambda x: x)
    with pytest.raises(TypeError, match="supports"):
        snopt_dyn.wrap(torch.zeros(3))


def test_importing_snopt_dyn_imports_no_adapter_or_library():
    code = ("import sys, snopt_dyn; bad = [m for m in sys.modules if m.startswith(('torchdyn', 'torchcde', "
            "'pytorch_lightning', 'snopt_dyn.adapters'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_torchdyn_interpolated_adjoint_returns_every_solver_point_like_native():
    """Issue 13.5: torchdyn's interpolated_adjoint returns every point its adaptive solver stepped on;
    wrapped, the same points come back (values equal native), with engine gradients."""
    torch.manual_seed(0)
    native = make_node(mlp(2, 2), solver="dopri5", sensitivity="interpolated_adjoint", atol=1e-6, rtol=1e-6,
                       atol_adjoint=1e-9, rtol_adjoint=1e-9).to(DT)
    reference = clone(native)
    reference.sensitivity = reference.sensalg = reference.vf.sensitivity = "autograd"
    reference.atol = reference.rtol = 1e-9  # backprop through a 1e-6 solve is itself 1.5% off
    wrapped = snopt_dyn.wrap(clone(native))
    x, t_span = _xy()[0], torch.linspace(0, 1, 3, dtype=DT)
    t_nat, s_nat = native(x, t_span)
    t_w, s_w = wrapped(x, t_span)
    assert len(t_nat) > len(t_span) and t_w.shape == t_nat.shape and s_w.shape == s_nat.shape
    assert float((t_w - t_nat).detach().abs().max()) < 1e-12 and float((s_w - s_nat).detach().abs().max()) < 1e-7
    for m, (_, sol) in ((reference, reference(x, t_nat.detach())), (wrapped, (t_w, s_w))):
        m.zero_grad()
        sol.pow(2).sum().backward()  # a loss on every solver point
    assert max_diff(grads(wrapped), grads(reference)) < 1e-4


def test_wrap_options():
    model = _build_alone()
    with pytest.raises(ValueError, match="positive finite"):
        snopt_dyn.wrap(model, train_terminal_time=True, terminal_time=-1.0)
    assert type(model) is NeuralODE  # nothing changed
    with pytest.raises(ValueError, match="fixed by the data"):
        snopt_dyn.wrap(NeuralCDE(3, 4, 2), train_terminal_time=True)
    snopt_dyn.wrap(model, method="rk4", seminorm=False, terminal_time=2.0)
    assert model._snopt_wrap.method == "rk4" and model._snopt_wrap.terminal_time == 2.0
    x = _xy()[0]
    grid = torch.linspace(0, 1, 4, dtype=DT)
    snopt_dyn.nfe.reset()
    model(x, grid)
    assert snopt_dyn.nfe.forward == 3 * 4  # rk4 on the 3-step grid: the override is used
    with pytest.raises(ValueError, match="cannot run on the engine"):
        snopt_dyn.wrap(make_node(mlp(2, 2), solver="ieuler"))
    # torchdyn's interpolated_adjoint returns no time gradient; wrapped, the engine gives one
    node = snopt_dyn.wrap(make_node(mlp(2, 2), solver="dopri5", sensitivity="interpolated_adjoint").to(DT))
    t_span = torch.tensor([0.0, 1.0], dtype=DT, requires_grad=True)
    node(x, t_span)[1][-1].sum().backward()
    assert t_span.grad is not None and float(t_span.grad.abs().sum()) > 0


def test_lightning_on_before_optimizer_step():
    """SNOpt's step() sits between backward and optimizer.step: Lightning's on_before_optimizer_step."""
    pl = pytest.importorskip("pytorch_lightning")

    class Learner(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = snopt_dyn.wrap(make_node(mlp(2, 2), solver="dopri5"))
            self.head = nn.Linear(2, 3)
            self.precond = snopt_dyn.SNOpt(self, update_freq=2)
            self.calls = 0

        def forward(self, x):
            return self.head(self.model(x, torch.linspace(0, 1, 2))[1][-1])

        def training_step(self, batch, _):
            x, y = batch
            return _ce(self(x), y)

        def on_before_optimizer_step(self, optimizer):
            self.precond.step()
            self.calls += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(16, 2)
    y = torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    learner = Learner()
    trainer = quiet(pl.Trainer, max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    quiet(trainer.fit, learner, loader)
    assert learner.calls == 4 and learner.precond.steps == 4
    assert learner.precond.layers()["model.vf.vf.vf.0"]["role"] == "ode"


def test_odernn_adjoint_gradients_match_backprop():
    """The per-series gap travels in the ODE state: an attribute set per solve was read again,
    changed, during the backward pass (5% gradient error for any adjoint, native or engine)."""
    from snopt_dyn.models import ODERNN

    torch.manual_seed(0)
    model = ODERNN(3, 8, 4, rtol=1e-9, atol=1e-9).double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    t = torch.cumsum(torch.rand(5, 6, dtype=torch.float64), 1)
    model.adjoint = False
    model(x, t).pow(2).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.adjoint = True
    snopt_dyn.wrap(model)(x, t).pow(2).sum().backward()
    for p, r in zip(model.parameters(), ref):
        assert float((p.grad - r).norm() / r.norm()) < 1e-6

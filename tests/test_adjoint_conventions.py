"""``snopt_dyn.odeint_adjoint`` as a drop-in for ``torchdiffeq.odeint_adjoint`` (issue 13).

Each test runs the same problem through both and compares what a user sees: outputs, gradients,
the callbacks called, what a norm receives, error control (same steps, so the same number of
field evaluations), and, against a tight float64 backprop reference, the gradient accuracy at equal
tolerance and equal norm on an MLP field, the torchcde Neural CDE field and a conv field.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torchdiffeq
from torch import nn

import snopt_dyn

DT = torch.float64


def grads(solve, inputs, weights):
    """Outputs and the gradients of a weighted loss on every output time w.r.t. ``inputs``."""
    ys = solve()
    parts = ys if isinstance(ys, tuple) else (ys,)
    loss = sum((w * p[k].pow(2).sum() for p in parts for k, w in enumerate(weights)), torch.zeros((), dtype=DT))
    return [p.detach() for p in parts], torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_same(a, b, tol=1e-10):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert (x is None or torch.all(x == 0)) and (y is None or torch.all(y == 0))
            continue
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


class MLP(nn.Module):
    def __init__(self, dim=3, hidden=16, time_dependent=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.time_dependent = time_dependent
        self.l1, self.l2 = nn.Linear(dim + 1, hidden), nn.Linear(hidden, dim)
        self.double()

    def forward(self, t, z):
        tt = torch.sin(2 * t) if self.time_dependent else torch.zeros_like(t)
        return self.l2(torch.tanh(self.l1(torch.cat([z, tt.expand(*z.shape[:-1], 1)], -1))))


# ----------------------------------------------------------------------------------------------
# 1. signature and defaults

def test_signature_and_defaults_are_torchdiffeqs():
    ours = inspect.signature(snopt_dyn.odeint_adjoint).parameters
    native = inspect.signature(torchdiffeq.odeint_adjoint).parameters
    for name, param in native.items():
        assert name in ours, name
        assert ours[name].default == param.default, (name, ours[name].default, param.default)
        assert ours[name].kind == param.kind, name
    assert ours["seminorm"].default is False  # torchdiffeq's error control unless asked


def test_no_tolerances_and_method_none_mean_torchdiffeqs_defaults():
    func = MLP()
    y0 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=DT)
    inputs = (y0, *func.parameters())
    for kw in ({}, dict(method=None), dict(rtol=None, atol=None, method=None)):
        out, g = grads(lambda: snopt_dyn.odeint_adjoint(func, y0, t, **kw), inputs, [0, 1, 1])
        nat, gn = grads(lambda: torchdiffeq.odeint_adjoint(func, y0, t), inputs, [0, 1, 1])
        assert_same(out, nat, 1e-12)
        assert_same(g, gn, 1e-9)


# ----------------------------------------------------------------------------------------------
# 2. states and fields torchdiffeq takes

class Decay(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(0.7, dtype=DT))

    def forward(self, t, z):
        return -self.k * z + torch.sin(t)


class Mixed(nn.Module):
    """A tuple state ``(z, s)`` with a 0-dim ``s`` that accumulates ``|z|^2``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(2, 2).double()
        self.k = nn.Parameter(torch.tensor(0.3, dtype=DT))

    def forward(self, t, state):
        z, s = state
        return torch.tanh(self.lin(z)), self.k * z.pow(2).sum() - 0.1 * s


@pytest.mark.parametrize("case", ["0-dim", "tuple-with-0-dim"])
def test_zero_dim_states(case):
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT, requires_grad=True)
    if case == "0-dim":
        func, y0 = Decay(), torch.tensor(1.5, dtype=DT, requires_grad=True)
        inputs = (y0, t, func.k)
    else:
        func = Mixed()
        y0 = (torch.randn(3, 2, dtype=DT, requires_grad=True), torch.tensor(0.2, dtype=DT, requires_grad=True))
        inputs = (*y0, t, *func.parameters())
    kw = dict(rtol=1e-9, atol=1e-10)
    out, g = grads(lambda: snopt_dyn.odeint_adjoint(func, y0, t, **kw), inputs, [0.5, 1.0, -2.0])
    nat, gn = grads(lambda: torchdiffeq.odeint_adjoint(func, y0, t, **kw), inputs, [0.5, 1.0, -2.0])
    assert [o.shape for o in out] == [n.shape for n in nat]
    assert_same(out, nat, 1e-12)
    assert_same(g, gn, 1e-7)


def test_single_output_time_returns_y0():
    func = MLP()
    y0 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.3], dtype=DT, requires_grad=True)
    inputs = (y0, t, *func.parameters())
    out, g = grads(lambda: snopt_dyn.odeint_adjoint(func, y0, t), inputs, [2.0])
    nat, gn = grads(lambda: torchdiffeq.odeint_adjoint(func, y0, t), inputs, [2.0])
    assert out[0].shape == (1, 4, 3) and torch.equal(out[0][0], y0.detach())
    assert_same(out, nat, 0)
    assert_same(g, gn, 0)


class Cos(nn.Module):
    def forward(self, t, z):
        return torch.cos(t) * torch.ones_like(z)


class Constant(nn.Module):
    def forward(self, t, z):
        return torch.full_like(z, 0.5)


@pytest.mark.parametrize("field", [Cos, Constant])
def test_field_independent_of_state_and_parameters(field):
    """``dz/dt = cos(t)``: exact values and gradients, as torchdiffeq gives; a constant field
    (whose output has no graph at all) too."""
    y0 = torch.randn(3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.2, 0.9, 1.7], dtype=DT, requires_grad=True)
    w = [0.5, 1.0, -2.0]
    kw = dict(rtol=1e-11, atol=1e-12, adjoint_params=())
    out, g = grads(lambda: snopt_dyn.odeint_adjoint(field(), y0, t, **kw), (y0, t), w)
    if field is Cos:  # torchdiffeq itself fails on an output without a graph (the constant)
        nat, gn = grads(lambda: torchdiffeq.odeint_adjoint(field(), y0, t, **kw), (y0, t), w)
        assert_same(out, nat, 1e-9)
        assert_same(g, gn, 1e-8)

    def exact(y0, t):  # z(t) = z0 + F(t) - F(t0), F = sin (or 0.5 t)
        prim = torch.sin if field is Cos else (lambda s: 0.5 * s)
        z = torch.cat([y0[None], y0 + (prim(t) - prim(t[0]))[1:, None]])
        return [z]

    want, gw = grads(lambda: exact(y0, t)[0], (y0, t), w)
    torch.testing.assert_close(out[0], want[0], rtol=1e-9, atol=1e-9)
    assert_same(g, gw, 1e-8)


def test_tuple_state_forward_matches_native_at_loose_tolerance():
    """Per-part error control: a ``(z, logp)`` state takes torchdiffeq's steps (the issue measured
    2.3e-4 with one RMS over the concatenation)."""

    class CNFLike(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.lin = nn.Linear(2, 2).double()

        def forward(self, t, state):
            z, logp = state
            return torch.tanh(self.lin(z)), -(1 - torch.tanh(self.lin(z)).pow(2)).sum(-1) * 1e-3

    y0 = (torch.randn(64, 2, dtype=DT), torch.zeros(64, dtype=DT))
    t = torch.tensor([0.0, 1.0], dtype=DT)
    ours = snopt_dyn.odeint_adjoint(CNFLike(), y0, t, rtol=1e-3, atol=1e-5)
    native = torchdiffeq.odeint_adjoint(CNFLike(), y0, t, rtol=1e-3, atol=1e-5)
    for a, b in zip(ours, native):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# 3. callbacks and norms

class Logged(MLP):
    def __init__(self):
        super().__init__()
        self.log = []
        for name in ("callback_step", "callback_accept_step", "callback_reject_step"):
            for suffix in ("", "_adjoint"):
                setattr(self, name + suffix, self._logger(name + suffix))

    def _logger(self, name):
        def log(t0, y0, dt):
            shapes = [tuple(p.shape) for p in y0] if isinstance(y0, tuple) else tuple(y0.shape)
            self.log.append((name, float(t0), shapes))
        return log


def test_callbacks_are_called_as_torchdiffeq_calls_them():
    y0 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    logs = []
    for solve in (snopt_dyn.odeint_adjoint, torchdiffeq.odeint_adjoint):
        func = Logged()
        solve(func, y0, t, rtol=1e-3, atol=1e-3)[-1].pow(2).sum().backward()
        logs.append(func.log)
    ours, native = logs
    names = {entry[0] for entry in native}
    assert {"callback_step", "callback_accept_step", "callback_step_adjoint",
            "callback_accept_step_adjoint"} <= names
    assert [e[0] for e in ours] == [e[0] for e in native]
    assert [e[2] for e in ours] == [e[2] for e in native]   # (4, 3) forward; (t, y, a, *params) backward
    assert [e[1] for e in ours] == pytest.approx([e[1] for e in native], abs=1e-12)


def _backward_calls(solve, func, y0, t, **kw):
    ys = solve(func, y0, t, **kw)
    before = func.calls
    ys[-1].pow(2).sum().backward()
    return func.calls - before


class Counting(MLP):
    calls = 0

    def forward(self, t, z):
        self.calls += 1
        return super().forward(t, z)


def test_adjoint_norm_option_wins_over_the_seminorm_keyword():
    func = Counting(time_dependent=False)
    y0 = torch.randn(16, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    kw = dict(rtol=1e-6, atol=1e-6)
    native_full = _backward_calls(torchdiffeq.odeint_adjoint, func, y0, t, **kw)
    native_semi = _backward_calls(torchdiffeq.odeint_adjoint, func, y0, t, adjoint_options={"norm": "seminorm"}, **kw)
    assert native_semi < native_full  # the problem can tell the two norms apart
    assert _backward_calls(snopt_dyn.odeint_adjoint, func, y0, t, **kw) == native_full
    assert _backward_calls(snopt_dyn.odeint_adjoint, func, y0, t, seminorm=True, **kw) == native_semi
    assert _backward_calls(snopt_dyn.odeint_adjoint, func, y0, t, seminorm=False,
                           adjoint_options={"norm": "seminorm"}, **kw) == native_semi

    seen = {}

    def recording(name):
        def norm(parts):
            seen.setdefault(name, [tuple(p.shape) for p in parts])
            return max(p.pow(2).mean().sqrt() for p in parts[:3])  # a user's own seminorm
        return norm

    with pytest.warns(UserWarning, match="seminorm=True is ignored"):
        ours = _backward_calls(snopt_dyn.odeint_adjoint, func, y0, t, seminorm=True,
                               adjoint_options={"norm": recording("ours")}, **kw)
    native = _backward_calls(torchdiffeq.odeint_adjoint, func, y0, t, adjoint_options={"norm": recording("native")},
                             **kw)
    assert seen["ours"] == seen["native"] == [(), (16, 3), (16, 3)] + [tuple(p.shape) for p in func.parameters()]
    assert ours == native


def test_forward_norm_option_gets_the_tuple_state():
    func = Mixed()
    y0 = (torch.randn(3, 2, dtype=DT), torch.tensor(0.2, dtype=DT))
    seen = []

    def norm(parts):
        seen.append(tuple(tuple(p.shape) for p in parts))
        return max(p.abs().max() for p in parts)

    t = torch.tensor([0.0, 1.0], dtype=DT)
    ours = snopt_dyn.odeint_adjoint(func, y0, t, rtol=1e-5, atol=1e-7, options={"norm": norm})
    native = torchdiffeq.odeint_adjoint(func, y0, t, rtol=1e-5, atol=1e-7, options={"norm": norm})
    assert seen and set(seen) == {((3, 2), ())}
    assert_same(ours, native, 1e-12)


def test_event_fn_raises_naming_the_alternative():
    with pytest.raises(NotImplementedError, match=r"torchdiffeq\.odeint_adjoint\(.*event_fn"):
        snopt_dyn.odeint_adjoint(MLP(), torch.zeros(2, 3, dtype=DT), [0.0, 1.0], event_fn=lambda t, y: y.sum())


def test_adjoint_method_without_adjoint_options_raises_like_torchdiffeq():
    with pytest.raises(ValueError, match="pass adjoint_options too"):
        snopt_dyn.odeint_adjoint(MLP(), torch.zeros(2, 3, dtype=DT), [0.0, 1.0], method="rk4",
                                 options=dict(step_size=0.1), adjoint_method="dopri5")


# ----------------------------------------------------------------------------------------------
# 4. gradient accuracy at equal tolerance and equal norm, against tight float64 backprop

class CDEField(nn.Module):
    """torchcde's canonical CDE field ``f(z) dX/dt`` (CDEFunc of snopt_dyn.models.neural_cde)."""

    def __init__(self, X, channels, hidden, width=16):
        super().__init__()
        torch.manual_seed(3)
        self.X, self.channels, self.hidden = X, channels, hidden
        self.linear1, self.linear2 = nn.Linear(hidden, width), nn.Linear(width, hidden * channels)
        self.double()

    def forward(self, t, z):
        f = torch.tanh(self.linear2(torch.relu(self.linear1(z)))).view(*z.shape[:-1], self.hidden, self.channels)
        return (f @ self.X.derivative(t).unsqueeze(-1)).squeeze(-1)


class ConvField(nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(4)
        self.c1, self.c2 = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, channels, 3, padding=1)
        self.double()

    def forward(self, t, z):
        return self.c2(torch.tanh(self.c1(z)))


def _problem(kind):
    torch.manual_seed(5)
    if kind == "mlp":
        return MLP(dim=4, hidden=32, time_dependent=True, seed=6), torch.randn(16, 4, dtype=DT), \
            torch.tensor([0.0, 1.0], dtype=DT)
    if kind == "conv":
        return ConvField(), torch.randn(2, 3, 6, 6, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    import torchcde
    path = torch.cumsum(torch.randn(4, 8, 3, dtype=DT) * 0.3, dim=1)
    path = torch.cat([torch.linspace(0, 1, 8, dtype=DT).expand(4, 8)[..., None], path], -1)
    X = torchcde.CubicSpline(torchcde.hermite_cubic_coefficients_with_backward_differences(path))
    return CDEField(X, 4, 8), torch.randn(4, 8, dtype=DT), X.interval


def _gradient(solve, func, y0):
    y0 = y0.clone().requires_grad_(True)
    ys = solve(func, y0)
    target = torch.linspace(-1, 1, ys[-1].numel(), dtype=DT).view_as(ys[-1])
    loss = (ys[-1] - target).pow(2).mean()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, (y0, *func.parameters()))])


@pytest.mark.parametrize("kind", ["mlp", "cde", "conv"])
def test_gradient_error_at_most_native_at_equal_tolerance(kind):
    func, y0, t = _problem(kind)
    ref = _gradient(lambda f, y: torchdiffeq.odeint(f, y, t, rtol=1e-12, atol=1e-12), func, y0)
    rows = []
    for tol in (1e-3, 1e-4, 1e-5, 1e-6):
        for semi in (False, True):
            params = tuple(func.parameters())
            native = _gradient(lambda f, y: torchdiffeq.odeint_adjoint(
                f, y, t, rtol=tol, atol=tol, adjoint_params=params,
                adjoint_options={"norm": "seminorm"} if semi else None), func, y0)
            ours = _gradient(lambda f, y: snopt_dyn.odeint_adjoint(
                f, y, t, rtol=tol, atol=tol, adjoint_params=params, seminorm=semi), func, y0)
            err_n = ((native - ref).norm() / ref.norm()).item()
            err_o = ((ours - ref).norm() / ref.norm()).item()
            rows.append((tol, semi, err_o, err_n))
            assert err_o <= 1.2 * err_n + 1e-13, (tol, semi, err_o, err_n)
    print(f"\n[{kind}] tol, seminorm, ours, native, ratio")
    for tol, semi, eo, en in rows:
        print(f"  {tol:.0e} {semi!s:5} {eo:.3e} {en:.3e} {eo / max(en, 1e-300):.3f}")


def test_per_part_tolerances_raise_a_clear_error():
    with pytest.raises(TypeError, match="rtol must be one non-negative number"):
        snopt_dyn.odeint_adjoint(Mixed(), (torch.zeros(3, 2, dtype=DT), torch.tensor(0.0, dtype=DT)), [0.0, 1.0],
                                 rtol=(1e-5, 1e-3))
    y = snopt_dyn.odeint_adjoint(MLP(), torch.zeros(2, 3, dtype=DT), [0.0, 1.0], rtol=torch.tensor(1e-5), atol=None)
    assert y.shape == (2, 2, 3)


class _ContextField(nn.Module):
    """A field that reads ``self.ctx``, a tensor its own encoder made before the solve (a user
    pattern: conditioning on an encoded input); the encoder's gradient flows through that history."""

    def __init__(self):
        super().__init__()
        self.enc, self.net = nn.Linear(2, 3), nn.Linear(3, 3)

    def forward(self, t, y):
        return torch.tanh(self.net(y)) + self.ctx


def _context_grads(solve, **kwargs):
    torch.manual_seed(0)
    field = _ContextField().double()
    x, y0 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    field.ctx = field.enc(x)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    solve(field, y0, t, method="rk4", options={"step_size": 0.125}, **kwargs).square().sum().backward()
    return [p.grad for p in field.parameters()]


def test_a_context_attribute_with_a_history_gets_torchdiffeqs_gradient():
    """torchdiffeq differentiates through the context's history at every step (``retain_graph``);
    the engine did so once and then failed ("backward through the graph a second time")."""
    params = dict(adjoint_options={"step_size": 0.125})
    want = _context_grads(torchdiffeq.odeint_adjoint, adjoint_params=None)
    got = _context_grads(snopt_dyn.odeint_adjoint, **params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_a_wrapped_plain_odeint_counts_a_context_attributes_gradient_once():
    """Routed ``odeint`` lists the module's tensors: a context made from the encoder's parameters must
    not be listed beside them (its gradient would reach the encoder twice: a 2x error). Against
    back-propagation through rk4 the continuous adjoint differs by ~3e-8 relative."""
    want = _context_grads(torchdiffeq.odeint)
    torch.manual_seed(0)
    field = snopt_dyn.wrap(_ContextField().double())
    x, y0 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    field.ctx = field.enc(x)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torchdiffeq.odeint(field, y0, t, method="rk4", options={"step_size": 0.125}).square().sum().backward()
    for g, w in zip([p.grad for p in field.parameters()], want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)

"""The engine's SDE adjoint (snopt_dyn.sdeint_adjoint) against torchsde's.

Each comparison builds a fresh ``BrownianInterval`` with the same entropy for each solve, so both
query the same path in the same order; outputs and every gradient must then be equal bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

torchsde = pytest.importorskip("torchsde")

import snopt_dyn  # noqa: E402
from snopt_dyn import hooks, sde_torchsde  # noqa: E402

B, D, M = 4, 3, 2
T1 = 0.4


class ToySDE(nn.Module):
    """A small SDE of every noise type: tanh drift, sigmoid diffusion, prior drift ``h`` for logqp."""

    def __init__(self, noise_type: str, sde_type: str, zero_diffusion: bool = False):
        super().__init__()
        self.noise_type, self.sde_type = noise_type, sde_type
        self.m = 1 if noise_type == "scalar" else (D if noise_type == "diagonal" else M)
        self.zero_diffusion = zero_diffusion
        self.f_net = nn.Linear(D, D)
        self.h_net = nn.Linear(D, D)
        if noise_type == "additive":
            self.g_par = nn.Parameter(torch.randn(D, self.m) * 0.3)
        else:
            self.g_net = nn.Linear(D, D if noise_type == "diagonal" else D * self.m)

    def f(self, t, y):
        return torch.tanh(self.f_net(y)) - 0.5 * y

    def h(self, t, y):
        return torch.tanh(self.h_net(y))

    def g(self, t, y):
        if self.noise_type == "additive":
            out = (self.g_par * (1 + t)).expand(y.size(0), D, self.m)
        else:
            out = 0.5 * torch.sigmoid(self.g_net(y))
            out = out if self.noise_type == "diagonal" else out.view(y.size(0), D, self.m)
        return out * 0 if self.zero_diffusion else out


def _brownian(m, dtype, method=None, entropy=7, t1=T1):
    levy = "space-time" if method == "srk" else "none"
    return torchsde.BrownianInterval(t0=0.0, t1=t1, size=(B, m), dtype=dtype, entropy=entropy,
                                     levy_area_approximation=levy)


def _solve(solver, noise, sde_type, method, adjoint_method, n_ts, dtype, logqp=False, dt=0.05, t1=T1, **kwargs):
    """Outputs and gradients (y0 first, then every parameter) of one solve and one backward."""
    torch.manual_seed(0)
    sde = ToySDE(noise, sde_type).to(dtype)
    y0 = torch.randn(B, D, dtype=dtype, requires_grad=True)
    ts = torch.linspace(0, t1, n_ts, dtype=dtype)
    bm = kwargs.pop("bm") if "bm" in kwargs else _brownian(sde.m + (1 if logqp and noise == "diagonal" else 0),
                                                           dtype, method, t1=t1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's notes on step sizes, identical for both
        out = solver(sde, y0, ts, bm=bm, method=method, adjoint_method=adjoint_method, dt=dt, logqp=logqp,
                     **kwargs)
        ys, kl = out if logqp else (out, torch.zeros(()))
        loss = (ys ** 2).sum() + ys.sin().sum() + kl.sum()
        loss.backward()
    grads = [y0.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in sde.parameters()]
    return [ys.detach(), kl.detach()], grads


def _assert_identical(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert x.dtype == y.dtype and torch.equal(x, y), (x - y).abs().max()


CASES = []
for _noise in ("diagonal", "general", "scalar", "additive"):
    CASES += [(_noise, "stratonovich", "reversible_heun", "adjoint_reversible_heun"),
              (_noise, "stratonovich", "midpoint", "midpoint"),
              (_noise, "stratonovich", "euler_heun", "euler_heun"),
              (_noise, "ito", "euler", "euler"),
              (_noise, "ito", "euler", None)]  # torchsde's default adjoint (milstein for diagonal)
    if _noise != "general":
        # torchsde's Itô milstein adjoint exists for diagonal noise only
        CASES += [(_noise, "ito", "milstein", "milstein" if _noise == "diagonal" else None)]
CASES += [("diagonal", "ito", "srk", None), ("diagonal", "stratonovich", "heun", None),
          ("scalar", "stratonovich", "milstein", None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n_ts", [2, 9])
@pytest.mark.parametrize("case", CASES, ids=["-".join(str(x) for x in c) for c in CASES])
def test_gradients_equal_torchsde_bit_for_bit(case, n_ts, dtype):
    native = _solve(torchsde.sdeint_adjoint, *case, n_ts, dtype)
    engine = _solve(snopt_dyn.sdeint_adjoint, *case, n_ts, dtype)
    _assert_identical(native, engine)


@pytest.mark.parametrize("noise", ["diagonal", "general"])
def test_logqp_equals_torchsde(noise):
    native = _solve(torchsde.sdeint_adjoint, noise, "ito", "euler", None, 5, torch.float64, logqp=True)
    engine = _solve(snopt_dyn.sdeint_adjoint, noise, "ito", "euler", None, 5, torch.float64, logqp=True)
    assert native[0][1].shape == (4, B)
    _assert_identical(native, engine)


@pytest.mark.parametrize("case", [("diagonal", "stratonovich", "midpoint", "midpoint"),
                                  ("general", "stratonovich", "reversible_heun", None)], ids=["midpoint", "rev-heun"])
def test_adaptive_steps_equal_torchsde(case):
    kwargs = dict(adaptive=True, adjoint_adaptive=True, rtol=0.03, atol=0.03, adjoint_rtol=0.03, adjoint_atol=0.03)
    native = _solve(torchsde.sdeint_adjoint, *case, 3, torch.float64, **kwargs)
    engine = _solve(snopt_dyn.sdeint_adjoint, *case, 3, torch.float64, **kwargs)
    _assert_identical(native, engine)


def test_names_extra_and_solver_state_equal_torchsde():
    """``names=`` (the prior via ``names={'drift': 'h'}``), ``extra=True`` and a given
    ``extra_solver_state``: the same returns and gradients, the solver state's included."""
    def run(solver):
        torch.manual_seed(1)
        sde = ToySDE("general", "stratonovich").double()
        y0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
        ts = torch.linspace(0, T1, 5, dtype=torch.float64)
        f0, g0 = sde.h(ts[0], y0), sde.g(ts[0], y0)
        state = (f0, g0, y0 * 1.0)
        ys, extra = solver(sde, y0, ts, bm=_brownian(M, torch.float64), method="reversible_heun", dt=0.05,
                           names={"drift": "h"}, extra=True, extra_solver_state=state)
        (ys.square().sum() + sum(e.sum() for e in extra)).backward()
        return [ys.detach(), *(e.detach() for e in extra)], [y0.grad] + [p.grad if p.grad is not None else
                                                                          torch.zeros_like(p) for p in sde.parameters()]
    native, engine = run(torchsde.sdeint_adjoint), run(snopt_dyn.sdeint_adjoint)
    assert len(native[0]) == 4
    _assert_identical(native, engine)


def test_adjoint_params_with_a_context_tensor():
    """A tensor read by the drift that is not a parameter (the Lorenz example's context) gets its
    gradient when listed in ``adjoint_params``, as in torchsde."""
    class WithContext(ToySDE):
        def f(self, t, y):
            return super().f(t, y) + self.ctx

    def run(solver):
        torch.manual_seed(2)
        sde = WithContext("diagonal", "stratonovich").double()
        ctx = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
        sde.ctx = ctx
        y0 = torch.randn(B, D, dtype=torch.float64)
        ts = torch.linspace(0, T1, 3, dtype=torch.float64)
        ys = solver(sde, y0, ts, bm=_brownian(D, torch.float64), dt=0.05,
                    adjoint_params=(ctx,) + tuple(sde.parameters()))
        ys.sum().backward()
        return [ys.detach()], [ctx.grad] + [p.grad for p in sde.parameters()]

    native, engine = run(torchsde.sdeint_adjoint), run(snopt_dyn.sdeint_adjoint)
    assert engine[1][0] is not None and engine[1][0].abs().sum() > 0
    _assert_identical(native, engine)


def test_default_brownian_motion_is_built_once():
    """``bm=None``: the engine draws the default ``BrownianInterval`` as torchsde does (numpy's global
    seed) and its backward reuses that one path."""
    def run(solver):
        np.random.seed(3)
        return _solve(solver, "diagonal", "stratonovich", "midpoint", None, 4, torch.float64, bm=None)

    _assert_identical(run(torchsde.sdeint_adjoint), run(snopt_dyn.sdeint_adjoint))


def test_the_backward_queries_the_callers_brownian_motion():
    """The Brownian path is never rebuilt: the backward pass queries the very object the caller passed."""
    calls = []

    class Counting(torchsde.BrownianInterval):
        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            calls.append((float(ta), float(tb)))
            return super().__call__(ta, tb, return_U=return_U, return_A=return_A)

    torch.manual_seed(0)
    sde = ToySDE("diagonal", "stratonovich").double()
    y0 = torch.randn(B, D, dtype=torch.float64)
    bm = Counting(t0=0.0, t1=T1, size=(B, D), dtype=torch.float64, entropy=5)
    ys = snopt_dyn.sdeint_adjoint(sde, y0, torch.tensor([0.0, T1], dtype=torch.float64), bm=bm, dt=0.1)
    forward_calls = len(calls)
    ys.sum().backward()
    assert forward_calls == 4 and len(calls) > forward_calls  # the backward queried the same object
    assert all(0.0 <= ta < tb <= T1 + 1e-12 for ta, tb in calls[forward_calls:])


@pytest.mark.parametrize("noise", ["diagonal", "general", "additive"])
def test_reversible_heun_pair_matches_backprop_through_sdeint(noise):
    """The exact pair: the engine's gradient equals back-propagation through torchsde.sdeint to 1e-8
    (output times on the step grid, exactly: dyadic times and step)."""
    grid = dict(dt=2.0 ** -5, t1=0.5)
    native = _solve(lambda *a, adjoint_method=None, **k: torchsde.sdeint(*a, **k),
                    noise, "stratonovich", "reversible_heun", None, 9, torch.float64, **grid)
    engine = _solve(snopt_dyn.sdeint_adjoint, noise, "stratonovich", "reversible_heun", None, 9, torch.float64, **grid)
    assert torch.equal(native[0][0], engine[0][0])
    for x, y in zip(native[1], engine[1]):
        assert (x - y).norm() <= 1e-8 * x.norm(), ((x - y).norm() / x.norm()).item()
    print(noise, "reversible Heun pair vs sdeint backprop, relative:",
          max(((x - y).norm() / x.norm()).item() for x, y in zip(native[1], engine[1])))


def test_zero_diffusion_reduces_to_the_ode_engine():
    """g ≡ 0 with midpoint at step h: the ODE engine with torchdiffeq's midpoint at step h gives the
    same outputs and gradients (1e-12, float64)."""
    h = 0.125
    torch.manual_seed(4)
    sde = ToySDE("diagonal", "stratonovich", zero_diffusion=True).double()
    ts = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(B, D), dtype=torch.float64, entropy=1)
    ys = snopt_dyn.sdeint_adjoint(sde, y0, ts, bm=bm, method="midpoint", dt=h)
    weights = torch.randn_like(ys)
    params = [sde.f_net.weight, sde.f_net.bias, y0]
    sde_grads = torch.autograd.grad((ys * weights).sum(), params, allow_unused=True)

    class Field(nn.Module):
        def __init__(self, sde):
            super().__init__()
            self.sde = sde

        def forward(self, t, y):
            return self.sde.f(t, y)

    field = Field(sde)
    ys_ode = snopt_dyn.odeint_adjoint(field, y0, ts, method="midpoint", options={"step_size": h},
                                      adjoint_params=tuple(field.sde.f_net.parameters()))
    ode_grads = torch.autograd.grad((ys_ode * weights).sum(), params)
    torch.testing.assert_close(ys, ys_ode, rtol=0, atol=1e-12)
    for a, b in zip(sde_grads, ode_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ sampling

class SDEObserver(hooks.EngineObserver):
    """Asks for SDE samples and, like SNOpt would, back-propagates ``a(t_j)`` through the step map
    ``f(t_j, z_j) Δt_j + g(t_j, z_j) ΔW_j`` (which must leave the solve's gradient alone)."""

    def __init__(self, count):
        self.count, self.batches, self.asked = count, [], []

    def sde_sample_spec(self, sde):
        self.asked.append(sde)
        return hooks.SampleSpec(count=self.count)

    def on_sde_samples(self, sde, batch):
        assert hooks.current_phase() == hooks.SAMPLE and torch.is_grad_enabled()
        self.batches.append(batch)
        fs = batch.forward_sde
        for j in range(len(batch.times)):
            z = batch.states[j].detach().requires_grad_()
            f, g = fs.f_and_g(batch.times[j], z)
            step = f * batch.weights[j] + fs.prod(g, batch.increments[j])
            params = [p for p in fs.parameters() if p.requires_grad]
            torch.autograd.grad(step, [z] + params, batch.adjoints[j], allow_unused=True)


SAMPLED = [("general", "stratonovich", "reversible_heun", "adjoint_reversible_heun"),
           ("diagonal", "stratonovich", "midpoint", "midpoint"),
           ("diagonal", "ito", "euler", None)]


@pytest.mark.parametrize("count", [4, 7])  # 4: the cell midpoints fall on output times
@pytest.mark.parametrize("case", SAMPLED, ids=["-".join(str(x) for x in c) for c in SAMPLED])
def test_sampling_changes_no_output_and_no_gradient(case, count):
    plain = _solve(snopt_dyn.sdeint_adjoint, *case, 9, torch.float64)
    observer = SDEObserver(count)
    handle = hooks.register_observer(observer)
    try:
        sampled = _solve(snopt_dyn.sdeint_adjoint, *case, 9, torch.float64)
    finally:
        handle.remove()
    _assert_identical(plain, sampled)
    (batch,) = observer.batches
    m = D if case[0] == "diagonal" else M
    assert batch.states.shape == batch.adjoints.shape == (count, B, D)
    assert batch.increments.shape == (count, B, m)
    torch.testing.assert_close(batch.times, (torch.arange(count, dtype=torch.float64) + 0.5) * T1 / count)
    assert abs(float(batch.weights.sum()) - T1) < 1e-12
    assert (batch.noise_type, batch.sde_type) == case[:2]


def test_samples_are_the_path_at_cell_midpoints():
    """Reversible Heun pair: the sampled ``z(t_j)`` is the forward solution at ``t_j`` (the backward
    rebuilds it exactly), and the increments ``ΔW_j`` tile the path: they sum to ``W(T) - W(t0)``."""
    grid = dict(dtype=torch.float64)
    torch.manual_seed(0)
    sde = ToySDE("diagonal", "stratonovich").double()
    y0 = torch.randn(B, D, **grid)
    ts = torch.linspace(0, 0.5, 5, **grid)
    observer = SDEObserver(3)
    handle = hooks.register_observer(observer)
    try:
        bm = _brownian(D, torch.float64, t1=0.5)
        ys = snopt_dyn.sdeint_adjoint(sde, y0, ts, bm=bm, method="reversible_heun", dt=2.0 ** -5)
        ys.square().sum().backward()
    finally:
        handle.remove()
    (batch,) = observer.batches
    all_ts = torch.unique(torch.cat([ts, batch.times]))  # sorted; 0.25 is an output time too
    with torch.no_grad():
        forward = torchsde.sdeint(sde, y0, all_ts, bm=_brownian(D, torch.float64, t1=0.5),
                                  method="reversible_heun", dt=2.0 ** -5)
    at = [int((all_ts == t).nonzero()) for t in batch.times]
    torch.testing.assert_close(batch.states, forward[at], rtol=0, atol=1e-10)
    torch.testing.assert_close(batch.increments.sum(0), bm(0.0, 0.5), rtol=0, atol=1e-12)
    assert observer.asked == [sde]


class _LeftEnds:
    """A sample plan at the left ends of the cells (the Itô choice), to show that it is wrong."""

    def __init__(self, count):
        self.count = count

    def host_times(self, t0, t1):
        width = (t1 - t0) / self.count
        return [t0 + width * j for j in range(self.count)], width


class _PairedSums(hooks.EngineObserver):
    """``sum_j a_j^T d(step map_j)/d(theta)``: what SNOpt's paired products add up to, per parameter."""

    def __init__(self, spec):
        self.spec, self.sums = spec, None

    def sde_sample_spec(self, sde):
        return self.spec

    def on_sde_samples(self, sde, batch):
        fs = batch.forward_sde
        params = list(fs.parameters())
        self.sums = [torch.zeros_like(p) for p in params]
        for j in range(len(batch.times)):
            f, g = fs.f_and_g(batch.times[j], batch.states[j])
            step = f * batch.weights[j] + fs.prod(g, batch.increments[j])
            parts = torch.autograd.grad(step, params, batch.adjoints[j], allow_unused=True)
            for total, part in zip(self.sums, parts):
                if part is not None:
                    total += part


def test_paired_products_converge_at_cell_midpoints_not_left_ends():
    """The parameter gradient is a Stratonovich integral: sums over sample cells with ``(z, a)`` at the
    cell midpoints approach it as the cells refine; at the left ends they stay off (the Itô bias)."""
    torch.manual_seed(0)
    sde = ToySDE("diagonal", "stratonovich").double()
    n = 128
    y0 = torch.randn(n, D, dtype=torch.float64)
    observers = {name: _PairedSums(spec) for name, spec in [
        ("mid10", hooks.SampleSpec(count=10)), ("mid50", hooks.SampleSpec(count=50)), ("left50", _LeftEnds(50))]}
    handles = [hooks.register_observer(o) for o in observers.values()]
    try:
        bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(n, D), dtype=torch.float64, entropy=3)
        ys = snopt_dyn.sdeint_adjoint(sde, y0, [0.0, 1.0], bm=bm, method="midpoint", dt=2e-3)
        ys[-1].square().sum().backward()
    finally:
        for h in handles:
            h.remove()
    names = [name for name, _ in sde.named_parameters()]
    err = {key: {name: float((s - p.grad).norm() / p.grad.norm())
                 for name, s, p in zip(names, o.sums, sde.parameters()) if not name.startswith("h_net")}
           for key, o in observers.items()}
    # seen: g_net.weight 2.3% (10 midpoint cells), 0.97% (50), 10.5% (50 left ends)
    assert max(err["mid50"].values()) < 0.03, err
    assert err["mid50"]["g_net.weight"] < err["mid10"]["g_net.weight"], err
    assert err["left50"]["g_net.weight"] > max(0.05, 5 * err["mid50"]["g_net.weight"]), err


def test_ode_observers_are_not_asked_about_sde_solves():
    class ODEObserver(hooks.EngineObserver):
        calls = 0

        def on_forward(self, func, y0, t):
            self.calls += 1

        def sample_spec(self, func):
            self.calls += 1
            return hooks.SampleSpec(count=3)

    observer = ODEObserver()
    handle = hooks.register_observer(observer)
    try:
        _solve(snopt_dyn.sdeint_adjoint, "diagonal", "stratonovich", "midpoint", None, 3, torch.float64)
    finally:
        handle.remove()
    assert observer.calls == 0


# ------------------------------------------------------------------------------------ bad input

def _bad_call(solver, y0=None, ts=None):
    torch.manual_seed(0)
    sde = ToySDE("diagonal", "stratonovich").double()
    y0 = torch.randn(B, D, dtype=torch.float64) if y0 is None else y0
    ts = torch.tensor([0.0, 0.2, 0.4], dtype=torch.float64) if ts is None else ts
    return solver(sde, y0, ts, dt=0.1)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # torchsde's, on the native call
@pytest.mark.parametrize("what, kwargs, words", [
    ("y0 1-D", dict(y0=torch.zeros(D, dtype=torch.float64)), "2-D"),
    ("y0 3-D", dict(y0=torch.zeros(2, B, D, dtype=torch.float64)), "reshape"),
    ("ts decreasing", dict(ts=torch.tensor([0.4, 0.2, 0.0], dtype=torch.float64)), "strictly increasing"),
    ("ts repeated", dict(ts=[0.0, 0.2, 0.2]), "strictly increasing"),
    ("ts grad", dict(ts=torch.tensor([0.0, 0.4], dtype=torch.float64, requires_grad=True)), "ts.detach()"),
])
def test_bad_inputs_fail_where_torchsde_fails(what, kwargs, words):
    with pytest.raises(ValueError):
        _bad_call(torchsde.sdeint_adjoint, **kwargs)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _bad_call(snopt_dyn.sdeint_adjoint, **kwargs)


def test_a_non_module_sde_needs_adjoint_params():
    class Plain:
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return torch.ones_like(y)

    y0 = torch.zeros(B, D)
    with pytest.raises(ValueError, match="adjoint_params"):
        snopt_dyn.sdeint_adjoint(Plain(), y0, [0.0, 0.1])
    ys = snopt_dyn.sdeint_adjoint(Plain(), y0, [0.0, 0.1], adjoint_params=(), dt=0.05)
    assert ys.shape == (2, B, D)


def test_double_backward_is_refused_with_the_fix():
    torch.manual_seed(0)
    sde = ToySDE("diagonal", "stratonovich").double()
    y0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    ys = snopt_dyn.sdeint_adjoint(sde, y0, [0.0, 0.2], bm=_brownian(D, torch.float64), dt=0.1)
    with pytest.raises(NotImplementedError, match="torchsde.sdeint_adjoint"):
        torch.autograd.grad(ys.sum(), y0, create_graph=True)


def test_solver_evaluations_are_marked_as_engine_solves():
    """Every evaluation of the SDE made by the engine (shape check, solves, backward) runs in phase
    SOLVE, so layer hooks never take one for an ordinary forward call (or for another library's)."""
    phases = []
    torch.manual_seed(0)
    sde = ToySDE("general", "stratonovich").double()
    for m in (sde.f_net, sde.g_net):
        m.register_forward_hook(lambda mod, inp, out: phases.append(hooks.current_phase()))
    y0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    ys = snopt_dyn.sdeint_adjoint(sde, y0, [0.0, 0.2, 0.4], bm=_brownian(M, torch.float64),
                                  method="reversible_heun", dt=0.1)
    ys.sum().backward()
    assert phases and set(phases) == {hooks.SOLVE}


# ------------------------------------------------------------------------ the torchsde contract

def test_torchsde_private_pieces_keep_their_contract():
    """The private torchsde names and signatures the engine calls (snopt_dyn/sde_torchsde.py)."""
    found = sde_torchsde.parts()
    assert sde_torchsde.contract_problems(found) == []
    low, high = sde_torchsde.SUPPORTED
    assert low <= sde_torchsde._version_tuple(torchsde.__version__) < high


def _defaults(fn):
    import inspect
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_same_signature_and_defaults_as_torchsde():
    """A drop-in: the engine and the wrap stand-ins take torchsde's parameters, in its order, with its defaults."""
    from snopt_dyn.adapters import torchsde as adapter
    native = _defaults(adapter.ORIGINALS["sdeint_adjoint"])
    assert _defaults(snopt_dyn.sdeint_adjoint) == native
    assert _defaults(adapter.sdeint_adjoint) == native
    assert _defaults(adapter.sdeint) == _defaults(adapter.ORIGINALS["sdeint"])


@pytest.mark.parametrize("version", ["0.2.5", "0.3.0", "1.0"])
def test_unchecked_torchsde_versions_are_refused_with_the_fix(version):
    with pytest.raises(ImportError, match="pip install 'torchsde>=0.2.6,<0.2.7'"):
        sde_torchsde.check_version(version)
    sde_torchsde.check_version("0.2.6")
    sde_torchsde.check_version("0.2.6.post1")
    sde_torchsde.check_version("0.2.6rc1")


def test_snopt_dyn_imports_without_torchsde():
    code = ("import sys; sys.modules['torchsde'] = None\n"
            "import snopt_dyn, torch\n"
            "try:\n"
            "    snopt_dyn.sdeint_adjoint(None, torch.zeros(1, 1), [0.0, 1.0])\n"
            "except ImportError as e:\n"
            "    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: snopt_dyn.sdeint_adjoint needs torchsde: pip install" in out.stdout


class _CountingSDE(ToySDE):
    """Counts its own drift and diffusion calls, into the bucket the test names."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls, self.bucket = {"forward": 0, "backward": 0}, "forward"

    def f(self, t, y):
        self.calls[self.bucket] += 1
        return super().f(t, y)

    def g(self, t, y):
        self.calls[self.bucket] += 1
        return super().g(t, y)


#: torchsde's ``check_contract`` calls ``f`` and ``g`` once each, before any solve, to check shapes
CONTRACT_CALLS = 2


@pytest.mark.parametrize("noise,sde_type,method", [("diagonal", "ito", "euler"), ("general", "ito", "euler"),
                                                   ("diagonal", "stratonovich", "midpoint"),
                                                   ("diagonal", "stratonovich", "reversible_heun")])
def test_nfe_counts_the_sdes_own_evaluations_by_pass(noise, sde_type, method):
    """``snopt_dyn.nfe`` equals the SDE's own count of its calls, by pass (the shape check apart)."""
    sde = _CountingSDE(noise, sde_type).double()
    y0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    ts = torch.linspace(0, T1, 3, dtype=torch.float64)
    snopt_dyn.nfe.reset()
    ys = snopt_dyn.sdeint_adjoint(sde, y0, ts, bm=_brownian(sde.m, torch.float64), method=method, dt=0.05)
    sde.bucket = "backward"
    ys.pow(2).sum().backward()
    assert sde.calls["backward"] > 0
    assert snopt_dyn.nfe.forward == sde.calls["forward"] - CONTRACT_CALLS > 0
    assert snopt_dyn.nfe.backward == sde.calls["backward"]

"""Continuous normalizing flows under the engine and SNOpt (snopt_dyn.models.cnf, snopt_dyn.compare.tasks.flow)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import snopt_dyn
from snopt_dyn.models.cnf import CNF, CNFField, standard_normal_logprob


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _tiny(solver: str = "engine", trace: str = "exact", noise: str = "rademacher", seed: int = 0,
          tol: float = 1e-8, **kw) -> CNF:
    torch.manual_seed(seed)
    return CNF(2, (8,), trace=trace, noise=noise, T=0.5, rtol=tol, atol=tol, solver=solver, **kw).double()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ the log-density
class _LinearField(CNFField):
    """dz/dt = A z (the MLP is bypassed; the trace machinery is the CNF's own)."""

    def __init__(self, A: torch.Tensor, trace: str = "exact"):
        super().__init__(A.shape[0], (4,), trace=trace)
        self.A = nn.Parameter(A.clone())

    def net(self, t, z):
        return z @ self.A.t()


def test_linear_flow_log_likelihood_matches_closed_form():
    """data -> base on [0, T] with f = A z: z(T) = e^{AT} x and log p(x) = log N(e^{AT} x) + T tr A,
    i.e. x ~ N(0, e^{-AT} e^{-AᵀT})."""
    torch.manual_seed(0)
    d, T = 3, 0.7
    A = torch.randn(d, d, dtype=torch.float64) * 0.5
    x = torch.randn(16, d, dtype=torch.float64)
    for solver in ("engine", "torchdiffeq", "odeint"):
        model = CNF(d, T=T, rtol=1e-10, atol=1e-10, solver=solver).double()
        model.field = _LinearField(A)
        logp = model.log_prob(x)
        zT = x @ torch.linalg.matrix_exp(A * T).t()
        closed = standard_normal_logprob(zT).squeeze(-1) + T * torch.trace(A)
        assert torch.allclose(logp, closed, atol=1e-7, rtol=0), solver
        M = torch.linalg.matrix_exp(-A * T)
        gauss = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), M @ M.t())
        assert torch.allclose(logp, gauss.log_prob(x), atol=1e-7, rtol=0)
    # the gradient w.r.t. A reaches the parameter through the trace term too: d/dA [T tr A] = T I
    model = CNF(d, T=T, rtol=1e-10, atol=1e-10, solver="engine").double()
    model.field = _LinearField(A)
    model.log_prob(x).mean().backward()
    A_ = A.clone().requires_grad_(True)
    closed = (standard_normal_logprob(x @ torch.linalg.matrix_exp(A_ * T).t()).squeeze(-1) + T * torch.trace(A_)).mean()
    closed.backward()
    assert torch.allclose(model.field.A.grad, A_.grad, atol=1e-7)


def test_density_and_sampling_are_consistent():
    """A random flow: samples come out finite with the right shape; the model's density of its own
    base->data map equals the base density minus the log-determinant (round trip x -> z -> x)."""
    model = _tiny(solver="odeint", tol=1e-9)
    gen = torch.Generator().manual_seed(3)
    x = model.sample(32, generator=gen)
    assert x.shape == (32, 2) and torch.isfinite(x).all()
    z = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x, model.sample(32, generator=torch.Generator().manual_seed(3)))
    # pushing the samples back to the base recovers z
    t = torch.tensor([0.0, model.T], dtype=torch.float64)
    with torch.no_grad():
        import torchdiffeq
        back = torchdiffeq.odeint(model.field, x, t, rtol=1e-9, atol=1e-9)[-1]
    assert torch.allclose(back, z, atol=1e-6)


# ------------------------------------------------------------------------------ Hutchinson vs exact
@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_gradient_is_unbiased(noise):
    """Average Hutchinson gradients over many noise draws and compare with the exact-trace gradient.

    M independent groups, each one solve over the data replicated R times with a fresh noise vector
    per row, give M i.i.d. gradient estimates whose mean should be the exact gradient (the noise is
    held fixed along a trajectory, and z(t) does not depend on it, so E[εᵀJε] = tr J pathwise).  Each
    component must lie within 6 standard errors (t with M-1 dof; P(|t_19| > 6) ≈ 1e-5 per
    component, so < 1e-3 over the ~50 parameters even before the fixed seed makes it deterministic),
    and the comparison must have power: the standard errors are much smaller than the gradient.
    """
    torch.manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64) * 1.5
    exact = _tiny(trace="exact", tol=1e-7)
    (-exact.log_prob(x).mean()).backward()
    g_exact = _grads(exact)

    M, R = 20, 32
    model = _tiny(trace="hutchinson", noise=noise, tol=1e-7)
    xr = x.repeat(R, 1)
    estimates = []
    for _ in range(M):
        model.zero_grad()
        (-model.log_prob(xr).mean()).backward()
        estimates.append(_grads(model))
    est = torch.stack(estimates)
    mean, se = est.mean(0), est.std(0) / math.sqrt(M)
    z = (mean - g_exact) / (se + 1e-9)
    assert z.abs().max() < 6, f"max |z| = {z.abs().max():.2f}"
    assert se.norm() < 0.2 * g_exact.norm()  # the test can see a bias of 20 % of the gradient
    # and a single draw is noisy (the estimator is really stochastic)
    assert (est[0] - g_exact).norm() > 1e-4 * g_exact.norm()


def test_noise_is_fixed_during_a_solve_and_redrawn_per_forward():
    model = _tiny(trace="hutchinson", tol=1e-6)
    seen = []
    original = model.field.divergence

    def spy(dz, z, create_graph):
        seen.append(model.field.noise.clone())
        return original(dz, z, create_graph)

    model.field.divergence = spy
    x = torch.randn(5, 2, dtype=torch.float64)
    (-model.log_prob(x).mean()).backward()
    first = len(seen)
    assert first > 4 and all(torch.equal(s, seen[0]) for s in seen)  # forward and backward solve
    assert set(seen[0].unique().tolist()) <= {-1.0, 1.0}
    model.log_prob(x)
    assert not torch.equal(seen[-1], seen[0])
    # noise_seed: the model's own generator, independent of the global RNG
    noises = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        m = CNF(2, (4,), noise_seed=7).double()
        m.log_prob(x)
        noises.append(m.field.noise)
    assert torch.equal(noises[0], noises[1])


# ------------------------------------------------------------------------------ wrapped vs native
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_wrapped_matches_native_torchdiffeq_adjoint(trace):
    torch.manual_seed(1)
    x = torch.randn(16, 2, dtype=torch.float64)
    noise = torch.randn(16, 2, dtype=torch.float64)
    # tolerances 1e-10: the two adjoints take different steps (torchdiffeq's mixed norm over the
    # tuple state vs the engine's RMS norm over the flat state); both converge to the true gradient
    native = _tiny(solver="torchdiffeq", trace=trace, noise="gaussian", seed=4, tol=1e-10)
    wrapped = snopt_dyn.wrap(_tiny(solver="torchdiffeq", trace=trace, noise="gaussian", seed=4, tol=1e-10))
    engine = _tiny(solver="engine", trace=trace, noise="gaussian", seed=4, tol=1e-10)
    losses, grads = [], []
    for model in (native, wrapped, engine):
        snopt_dyn.nfe.reset()
        loss = -model.log_prob(x, noise=noise).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
        if model is native:
            assert snopt_dyn.nfe.total == 0  # native: torchdiffeq's own adjoint
        else:
            assert snopt_dyn.nfe.forward > 0 and snopt_dyn.nfe.backward > 0  # the engine ran
    for loss, grad in zip(losses[1:], grads[1:]):
        assert torch.allclose(loss, losses[0], atol=1e-9, rtol=0)
        assert (grad - grads[0]).norm() <= 1e-6 * grads[0].norm()
    assert torch.equal(grads[1], grads[2])  # wrap = calling the engine directly


# ------------------------------------------------------------------------------ SNOpt on the CNF
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_snopt_finds_field_layers_with_finite_factors(trace):
    """Every Linear of the field (state Linear, time gate, time shift of each ConcatSquashLinear) is
    an ODE layer with finite factors of the right shapes, recorded exactly once per sampled field
    evaluation (mult == J): the trace's inner autograd calls add no recorded forward calls."""
    J, N = 4, 12
    model = snopt_dyn.wrap(_tiny(solver="torchdiffeq", trace=trace, tol=1e-5))
    precond = snopt_dyn.SNOpt(model, num_samples=J, update_freq=10)
    x = torch.randn(N, 2, dtype=torch.float64)
    (-model(x).mean()).backward()
    precond.step()
    layers = precond.layers()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(layers) == sorted(linears) and len(linears) == 6
    factors = precond.factors()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        assert layers[name]["role"] == "ode" and layers[name]["samples"] == J, name
        a, g, mult = factors[name]
        d_in = module.in_features + (module.bias is not None)
        assert a.shape == (d_in, d_in) and g.shape == (module.out_features,) * 2, name
        assert mult == J, name
        assert torch.isfinite(a).all() and torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.allclose(a, a.t()) and torch.linalg.eigvalsh(a).min() > -1e-10
    assert precond.sampling_nfe == J
    # per-sample statistics for the time layers too: their input rows are (N, 1) time columns
    assert precond._layers[model.field.layers[0].gate].batch == N


def test_trace_in_curvature_changes_only_the_output_factors():
    x = torch.randn(12, 2, dtype=torch.float64)
    noise = torch.randn(12, 2, dtype=torch.float64)
    results = []
    for flag in (True, False):
        model = _tiny(solver="engine", trace="hutchinson", tol=1e-6, trace_in_curvature=flag)
        precond = snopt_dyn.SNOpt(model, num_samples=3)
        (-model(x, noise=noise).mean()).backward()
        raw = _grads(model)
        precond.step()
        results.append((raw, precond.factors()))
    (raw1, f1), (raw2, f2) = results
    assert torch.equal(raw1, raw2)  # training gradients do not depend on the option
    name = "field.layers.0.layer"
    assert torch.allclose(f1[name][0], f2[name][0])  # A: the same layer inputs
    assert not torch.allclose(f1[name][1], f2[name][1])  # G: without the trace's output gradients


def test_broadcast_time_layers_use_the_batch_of_the_solve():
    """FFJORD's (1, 1) time input: the gate and shift layers see one row, but their output gradient
    serves the whole batch, so SNOpt takes the batch size from the solve's state (12 here)."""
    model = _tiny(solver="engine", trace="exact", tol=1e-5, broadcast_time=True)
    precond = snopt_dyn.SNOpt(model, num_samples=3)
    (-model(torch.randn(12, 2, dtype=torch.float64)).mean()).backward()
    precond.step()
    gate = precond._layers[model.field.layers[0].gate]
    assert gate.batch == 12 and gate.mult == 3  # J samples, one row (location) each
    assert precond._layers[model.field.layers[0].layer].batch == 12


def test_state_part_of_the_kronecker_pairing_is_exact():
    """For the state output, Σ_b g_b x̄_bᵀ over the recorded calls is the parameter gradient of
    a_zᵀ f exactly (what the factors assume).  (For the log-density output it is not: the trace
    depends on W also through the Jacobian -- see the report in snopt_dyn/models/cnf.py.)"""
    model = _tiny(trace="hutchinson")
    field = model.field
    z = torch.randn(10, 2, dtype=torch.float64)
    field.draw_noise(z)
    calls = []
    handles = [m.register_forward_hook(lambda mod, i, o: calls.append((mod, i[0], o)))
               for m in field.modules() if isinstance(m, nn.Linear)]
    dz, ddelta = field(torch.tensor(0.2, dtype=torch.float64), (z, torch.zeros(10, 1, dtype=torch.float64)))
    for h in handles:
        h.remove()
    assert len(calls) == 6  # one forward call per Linear, the trace added none
    a = torch.randn_like(dz)
    outs = [o for _, _, o in calls]
    weights = [m.weight for m, _, _ in calls]
    res = torch.autograd.grad(dz, outs + weights, a)
    for (mod, x, _), g, gw in zip(calls, res[:6], res[6:]):
        assert torch.allclose(g.t() @ x, gw, atol=1e-12)


def test_snopt_sgd_reduces_nll_on_diamonds():
    from snopt_dyn.datasets import load_diamonds
    from snopt_dyn.compare.tasks.flow import build_flow_model, evaluate_nll, flow_loss
    x = load_diamonds("train")[::40][:1024]  # a spread-out subset
    held = load_diamonds("val")[:512]
    model = build_flow_model(seed=0, hidden=(32, 32), rtol=1e-3, atol=1e-3)
    precond = snopt_dyn.SNOpt(model, damping=0.05, update_freq=5, num_samples=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    before = evaluate_nll(model, held)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        index = torch.randint(0, len(x), (256,), generator=gen)
        opt.zero_grad()
        flow_loss(model, x[index]).backward()
        precond.step()
        opt.step()
    after = evaluate_nll(model, held)
    assert math.isfinite(after) and after < before - 2.0, (before, after)  # 8.6 -> 1.2 nats here
    assert precond.refreshes == 3 and all(v["role"] == "ode" for v in precond.layers().values())


def test_flow_benchmark_runs_interleaved():
    from snopt_dyn.compare.tasks.flow import benchmark_flow
    curves = benchmark_flow(("snopt", "adam@3e-3"), budget=0.5, max_train=512, max_test=64, eval_points=1,
                            batch_size=64, hidden=(8,), rtol=1e-3, atol=1e-3)
    result = curves.pop("_result")
    assert sorted(curves) == ["adam@3e-3", "snopt"]
    assert result.task.metric == "nll" and not result.task.higher_is_better
    for rows in curves.values():
        assert rows[0]["train_clock_s"] == 0 and rows[-1]["train_clock_s"] >= 0.5
        assert all(math.isfinite(r["test_nll"]) for r in rows)
        assert rows[-1]["nfe_forward"] > 0 and rows[-1]["nfe_backward"] > 0


# ------------------------------------------------------------------------------ torchdyn's CNF
def _torchdyn_cnf(seed: int, trace: str):
    pytest.importorskip("torchdyn")
    import warnings
    from torchdyn.core import NeuralODE
    from torchdyn.models import CNF as TorchdynCNF
    from torchdyn.models.cnf import autograd_trace, hutch_trace
    from torchdyn.nn import Augmenter
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    noise = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    estimator = hutch_trace if trace == "hutchinson" else autograd_trace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnf = TorchdynCNF(net, trace_estimator=estimator, noise_dist=noise if trace == "hutchinson" else None)
        node = NeuralODE(cnf, solver="dopri5", sensitivity="adjoint", atol=1e-6, rtol=1e-6,
                         atol_adjoint=1e-6, rtol_adjoint=1e-6)
    return nn.Sequential(Augmenter(augment_idx=1, augment_dims=1), node)


def _torchdyn_nll(model, x):
    _, sol = model(x)
    out = sol[-1]  # column 0: Δ = -∫ tr J, columns 1: : z(T)
    return -(standard_normal_logprob(out[:, 1:]).squeeze(-1) - out[:, 0]).mean()


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_torchdyn_cnf_wrapped_matches_native_and_trains_with_snopt(trace):
    x = torch.randn(32, 2)
    native, wrapped = _torchdyn_cnf(0, trace), _torchdyn_cnf(0, trace)
    snopt_dyn.wrap(wrapped)
    torch.manual_seed(5)  # the same Hutchinson noise (drawn in NeuralODE._prep_integration)
    l0 = _torchdyn_nll(native, x)
    l0.backward()
    torch.manual_seed(5)
    l1 = _torchdyn_nll(wrapped, x)
    l1.backward()
    assert torch.allclose(l0, l1, atol=1e-6)
    for p0, p1 in zip(native.parameters(), wrapped.parameters()):
        assert (p0.grad - p1.grad).norm() <= 1e-4 * p0.grad.norm() + 1e-7

    precond = snopt_dyn.SNOpt(wrapped, num_samples=4, update_freq=3)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = _torchdyn_nll(wrapped, x)
        loss.backward()
        precond.step()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # factors only for the net's Linear layers; the log-density column is not a layer input
    factors = precond.factors()
    assert sorted(factors) == ["1.vf.vf.vf.net.0", "1.vf.vf.vf.net.2"]
    a0, g0, mult = factors["1.vf.vf.vf.net.0"]
    assert a0.shape == (3, 3) and g0.shape == (16, 16) and mult == 4
    assert all(torch.isfinite(a).all() and torch.isfinite(g).all() for a, g, _ in factors.values())

"""Trainable horizon T: the policies on a problem with a known optimal horizon, and bad input."""
import copy
import math
import statistics

import pytest
import torch
import torchdiffeq
import torchsde
from torch import nn

import snopt_dyn
from snopt_dyn import TerminalTimeOptimizer
from snopt_dyn.terminal_time import attach_terminal_time, terminal_time_leaf

T_STAR = 2.0


class Decay(nn.Module):
    def forward(self, t, z):
        return -z


class Toy(nn.Module):
    """z(T) = e^{-T} z0 with a trainable horizon held as a ``terminal_time`` buffer."""

    def __init__(self, t0: float):
        super().__init__()
        self.field = Decay()
        attach_terminal_time(self, t0)
        self.offset = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, z0):
        t = torch.stack([torch.zeros((), dtype=torch.float64), terminal_time_leaf(self).double()])
        return snopt_dyn.odeint_adjoint(self.field, z0, t, adjoint_params=(), rtol=1e-5, atol=1e-7)[-1] + self.offset


def _updates_to_reach(policy, seed, lr, iters=200, update_freq=10):
    """Number of T updates until |T - T*| < 5% T*, for the target z(T*) = e^{-T*} z0."""
    gen = torch.Generator().manual_seed(seed)
    model = Toy(0.5)
    opt = TerminalTimeOptimizer(model, lr=lr, reg=1e-4, update_freq=update_freq, policy=policy)
    for k in range(iters):
        z0 = 1 + torch.rand(16, 1, generator=gen, dtype=torch.float64)
        loss = ((model(z0) - math.exp(-T_STAR) * z0) ** 2).mean()
        loss.backward()
        model.offset.grad = None
        opt.step()
        if abs(float(model.terminal_time.detach()) - T_STAR) < 0.05 * T_STAR:
            return (k + 1) // update_freq
    return math.inf


@pytest.mark.parametrize("lr", [0.1, 0.3])
def test_feedback_reaches_known_optimum_in_fewer_updates_than_gradient(lr):
    feedback = [_updates_to_reach("feedback", s, lr) for s in range(3)]
    gradient = [_updates_to_reach("gradient", s, lr) for s in range(3)]
    print(f"lr={lr}: updates to within 5% of T*: feedback {feedback}, gradient {gradient}")
    assert statistics.median(feedback) < math.inf
    assert statistics.median(feedback) < statistics.median(gradient)


def test_gradient_policy_moves_toward_optimum():
    model = Toy(0.5)
    opt = TerminalTimeOptimizer(model, lr=0.3, reg=1e-4, update_freq=1, policy="gradient", momentum=0.0)
    z0 = torch.ones(4, 1, dtype=torch.float64)
    for _ in range(5):
        ((model(z0) - math.exp(-T_STAR) * z0) ** 2).mean().backward()
        opt.step()
    assert 0.5 < float(model.terminal_time.detach()) < T_STAR
    assert opt.history["" ][0] == 0.5 and len(opt.history[""]) == 6


def test_t_min_and_state_dict():
    model = Toy(0.3)
    opt = TerminalTimeOptimizer(model, lr=100.0, reg=10.0, update_freq=1, policy="gradient", t_min=0.2, momentum=0.0)
    z0 = torch.ones(2, 1, dtype=torch.float64)
    model(z0).sum().backward()  # pushes T up? the reg pushes it down hard
    opt.step()
    assert float(model.terminal_time.detach()) >= 0.2
    state = copy.deepcopy(opt.state_dict())
    other = TerminalTimeOptimizer(Toy(0.3), lr=100.0)
    other.load_state_dict(state)
    assert other.calls == opt.calls and other.history == opt.history
    assert "terminal_time" in model.state_dict() and all(p is not model.terminal_time for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="no trainable horizon"):
        TerminalTimeOptimizer(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="policy"):
        TerminalTimeOptimizer(Toy(1.0), policy="newton")
    with pytest.raises(ValueError, match="positive finite"):
        TerminalTimeOptimizer(Toy(1.0), t_min=0.0)


# ------------------------------------------------------------------ trainable T through snopt_dyn.wrap
def _node(solver, t_span=None):
    from torchdyn.core import NeuralODE

    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    node = NeuralODE(field, solver=solver, atol=1e-9, rtol=1e-9, sensitivity="adjoint",
                     return_t_eval=False).double()
    node.t_span = None if t_span is None else t_span.double()  # torchdyn's default horizon for forward()
    return node


class UserODE(nn.Module):
    """A torchdiffeq model written by a user (one solve per forward)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, t, z):
        return self.net(z)

    def predict(self, x):
        return torchdiffeq.odeint_adjoint(self, x, torch.tensor([0.0, 1.0], dtype=x.dtype), rtol=1e-9, atol=1e-9)


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.ode = UserODE()

    def forward(self, x):
        return self.ode.predict(x)


def _fd_check(model, holder, x, last_only=True):
    def loss():
        out = model(x)
        return (out[-1] if last_only else out).pow(2).sum() + out[-1].sum()

    loss().backward()
    grad = float(holder.terminal_time.grad)
    h = 1e-3  # smaller steps drown in the adaptive solver's step-selection noise at tol 1e-9
    base = float(holder.terminal_time)
    with torch.no_grad():
        holder.terminal_time.fill_(base + h)
        up = float(loss())
        holder.terminal_time.fill_(base - h)
        down = float(loss())
        holder.terminal_time.fill_(base)
    fd = (up - down) / (2 * h)
    assert abs(grad - fd) <= 1e-5 * max(1.0, abs(fd)), (grad, fd)


@pytest.mark.parametrize("solver,t_span", [("dopri5", None), ("tsit5", torch.linspace(0, 1, 4)),
                                           ("rk4", torch.linspace(0, 1, 41))])
def test_dl_dT_matches_finite_differences_torchdyn(solver, t_span):
    node = snopt_dyn.wrap(_node(solver, t_span), train_terminal_time=True, terminal_time=1.3)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _fd_check(node, node, x, last_only=False)


def test_dl_dT_matches_finite_differences_torchdiffeq():
    model = snopt_dyn.wrap(UserModel().double(), train_terminal_time=True, terminal_time=0.8)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _fd_check(model, model, x)


def test_multi_point_t_span_scales_with_T():
    t_span = torch.linspace(0, 1, 5, dtype=torch.float64)
    plain = _node("dopri5", t_span)
    node = snopt_dyn.wrap(_node("dopri5", t_span), train_terminal_time=True, terminal_time=2.0)
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(node(x), plain(x, torch.linspace(0, 2, 5, dtype=torch.float64)), rtol=1e-6, atol=1e-8)


def test_terminal_time_in_state_dict_not_in_parameters():
    node = snopt_dyn.wrap(_node("dopri5"), train_terminal_time=True)
    assert float(node.terminal_time) == 1.0  # torchdyn's default t_span [0, 1]
    assert "terminal_time" in node.state_dict()
    assert all(p is not node.terminal_time for p in node.parameters())
    node.float()  # survives dtype moves: the gradient still arrives
    node(torch.randn(2, 2)).sum().backward()
    assert node.terminal_time.grad is not None


def test_bad_horizons_are_rejected():
    with pytest.raises(ValueError, match="positive finite"):
        snopt_dyn.wrap(_node("dopri5"), train_terminal_time=True, terminal_time=0.0)
    with pytest.raises(ValueError, match="positive finite"):
        snopt_dyn.wrap(_node("dopri5"), train_terminal_time=True, terminal_time=float("nan"))
    with pytest.raises(ValueError, match="terminal_time=<the horizon"):
        snopt_dyn.wrap(UserModel(), train_terminal_time=True)


def test_sde_model_with_trainable_T_is_rejected():
    model = SDEModel()
    with pytest.raises(ValueError, match="torchsde"):
        snopt_dyn.wrap(model, train_terminal_time=True)


class SDEModel(nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self):
        super().__init__()
        self.drift = nn.Linear(2, 2)

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return torch.ones_like(y)

    def forward(self, y0):
        return torchsde.sdeint(self, y0, torch.tensor([0.0, 1.0]))


@pytest.mark.slow
def test_digits_feedback_policy_keeps_accuracy_with_smaller_T():
    """Digits Neural ODE classifier from T=1: the feedback policy ends with a smaller T (fewer field
    evaluations per forward) and test accuracy within 1 point of fixed T=1."""
    from torchdyn.core import NeuralODE
    from snopt_dyn.datasets import load_digits

    X, Y = load_digits("train", flatten=True)
    Xt, Yt = load_digits("test", flatten=True)

    class Last(nn.Module):
        def forward(self, x):
            return x[-1]

    def train(trainable):
        torch.manual_seed(0)
        field = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))
        node = NeuralODE(field, solver="dopri5", atol=1e-3, rtol=1e-3, return_t_eval=False)
        model = snopt_dyn.wrap(nn.Sequential(nn.Linear(64, 32), node, Last(), nn.Linear(32, 10)),
                               train_terminal_time=trainable)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        precond = snopt_dyn.SNOpt(model, update_freq=50, num_samples=5)
        horizon = TerminalTimeOptimizer(model, lr=0.1, reg=1e-2, update_freq=20) if trainable else None
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(X), (128,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            precond.step()
            opt.step()
            if horizon:
                horizon.step()
        snopt_dyn.nfe.reset()
        with torch.no_grad():
            acc = (model(Xt).argmax(1) == Yt).float().mean().item()
        return acc, snopt_dyn.nfe.forward, horizon.history["1"] if horizon else [1.0]

    acc_fixed, nfe_fixed, _ = train(False)
    acc_T, nfe_T, history = train(True)
    print(f"fixed T=1: acc {acc_fixed:.4f}, NFE/forward {nfe_fixed}; feedback: acc {acc_T:.4f}, "
          f"NFE/forward {nfe_T}, T trajectory {[round(v, 3) for v in history]}")
    assert history[-1] < 1.0
    assert acc_T >= acc_fixed - 0.01
    assert nfe_T < nfe_fixed

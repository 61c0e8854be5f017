"""Trainable horizon T: the policies on a problem with a known optimal horizon, and bad input."""
import copy
import math
import statistics

import pytest
import torch
from torch import nn

import snopt_dyn
from snopt_dyn import TerminalTimeOptimizer

T_STAR = 2.0


class Decay(nn.Module):
    def forward(self, t, z):
        return -z


class Toy(nn.Module):
    """z(T) = e^{-T} z0 with a trainable horizon held as a ``terminal_time`` buffer."""

    def __init__(self, t0: float):
        super().__init__()
        self.field = Decay()
        self.register_buffer("terminal_time", torch.tensor(t0, dtype=torch.float64, requires_grad=True))
        self.offset = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, z0):
        t = torch.stack([torch.zeros((), dtype=torch.float64), self.terminal_time])
        return snopt_dyn.odeint_adjoint(self.field, z0, t, adjoint_params=())[-1] + self.offset


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

"""SNOpt's KL clip and the split of parameters between SNOpt's base optimizer and another one (issue 15).

Invariances: a clip that never binds changes nothing; a binding clip keeps the direction and puts
the step's curvature form ``lr² pᵀFp`` exactly on the bound; the learning rate read from the optimizer equals the number;
the parameter split is a partition and SNOpt never touches the other part's gradients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snopt_dyn
from test_sync_count import count_syncs, total

DT = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=DT)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(z)))


class Model(nn.Module):
    """Encoder, ODE block, a GRUCell and a LayerNorm (kinds SNOpt leaves alone), a head."""

    def __init__(self):
        super().__init__()
        self.enc, self.field, self.head = nn.Linear(4, 3), Field(), nn.Linear(3, 2)
        self.cell, self.norm = nn.GRUCell(3, 3), nn.LayerNorm(3)

    def forward(self, x):
        z = snopt_dyn.odeint_adjoint(self.field, self.enc(x), T01.to(x), method="rk4",
                                     options={"step_size": 0.25})[-1]
        return self.head(self.norm(self.cell(z, z)))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)


def _grads_after_steps(steps=3, **kwargs):
    torch.manual_seed(0)
    model = Model().to(DT)
    with pytest.warns(UserWarning, match="unsupported kinds"):
        precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=3, **kwargs)
    x, y = _data()
    raw = new = None
    for _ in range(steps):
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        precond.step()
        new = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, precond, raw, new


def _preconditioned(model, precond):
    ids = {id(p) for p in precond.preconditioned_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_a_clip_that_never_binds_changes_nothing():
    _, _, _, plain = _grads_after_steps()
    _, precond, _, clipped = _grads_after_steps(kl_clip=1e30, lr=0.1)
    assert float(precond.diagnostics()["kl_clip_scale"]) == 1.0
    for name in plain:
        assert torch.equal(plain[name], clipped[name]), name


def test_a_binding_clip_keeps_the_direction_and_meets_the_bound():
    model, precond, raw, plain = _grads_after_steps()
    names = _preconditioned(model, precond)
    lr = 0.5
    vg = lr ** 2 * sum(float((plain[n] * raw[n]).sum()) for n in names)
    bound = vg / 100  # binds: nu = 0.1
    _, precond, _, clipped = _grads_after_steps(kl_clip=bound, lr=lr)
    nu = float(precond.diagnostics()["kl_clip_scale"])
    assert nu == pytest.approx(0.1, rel=1e-9)
    # the clipped step's curvature form lr² pᵀFp, with F p = nu g for the clipped p, is on the bound
    got = nu * lr ** 2 * sum(float((clipped[n] * raw[n]).sum()) for n in names)
    assert got == pytest.approx(bound, rel=1e-9)
    for n in plain:
        want = plain[n] * nu if n in names else plain[n]  # layers SNOpt does not precondition: untouched
        torch.testing.assert_close(clipped[n], want, rtol=1e-12, atol=0)


def test_learning_rate_from_the_optimizer_number_or_schedule_agree():
    results = []
    for make_lr in (lambda opt: 0.3, lambda opt: opt, lambda opt: (lambda step: 0.3)):
        torch.manual_seed(0)
        model = Model().to(DT)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        with pytest.warns(UserWarning):
            precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=3, kl_clip=1e-4, lr=make_lr(opt))
        x, y = _data()
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            precond.step()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_clip_follows_the_optimizers_schedule():
    torch.manual_seed(0)
    model = Model().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.warns(UserWarning):
        precond = snopt_dyn.SNOpt(model, update_freq=100, num_samples=3, kl_clip=1e-6, lr=opt, moment="kfac")
    x, y = _data()
    scales = []
    for lr in (1.0, 0.5):
        for group in opt.param_groups:
            group["lr"] = lr
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        precond.step()
        scales.append(float(precond.diagnostics()["kl_clip_scale"]))
    # same weights (no opt.step), same gradient, fixed moment (kfac): nu is inversely proportional to lr
    assert scales[1] == pytest.approx(2 * scales[0], rel=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"kl_clip": 1e-3}, "kl_clip needs the base optimizer's learning rate"),
    ({"kl_clip": 0.0, "lr": 0.1}, "kl_clip must be a finite number > 0"),
    ({"kl_clip": float("nan"), "lr": 0.1}, "kl_clip must be a finite number > 0"),
    ({"kl_clip": True, "lr": 0.1}, "kl_clip must be a finite number > 0"),
])
def test_bad_clip_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        snopt_dyn.SNOpt(Field(), **kwargs)


def test_clip_adds_no_host_synchronisation():
    counts = []
    for kwargs in ({}, {"kl_clip": 1e-6, "lr": 0.1}):
        torch.manual_seed(0)
        model = Model().to(DT)
        with pytest.warns(UserWarning):
            precond = snopt_dyn.SNOpt(model, update_freq=100, num_samples=3, **kwargs)
        x, y = _data()
        for i in range(2):
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            if i == 0:
                precond.step()
                continue
            with count_syncs() as c:
                precond.step()
        counts.append(total(c, "snopt"))
    assert counts[1] == counts[0], counts


def test_parameter_split_is_a_partition_and_snopt_never_touches_the_other_part():
    model, precond, raw, new = _grads_after_steps()
    pre, others = precond.preconditioned_parameters(), precond.unpreconditioned_parameters()
    ids_pre, ids_other = {id(p) for p in pre}, {id(p) for p in others}
    assert not ids_pre & ids_other
    assert ids_pre | ids_other == {id(p) for p in model.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in ids_other}
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("cell.", "norm."))}
    for n in names:
        assert torch.equal(raw[n], new[n]), n
    assert any(not torch.equal(raw[n], new[n]) for n in _preconditioned(model, precond))


def test_skipped_layers_are_in_the_other_part():
    model = Model()
    with pytest.warns(UserWarning):
        precond = snopt_dyn.SNOpt(model, skip=["head"])
    assert {id(model.head.weight), id(model.head.bias)} <= {id(p) for p in precond.unpreconditioned_parameters()}

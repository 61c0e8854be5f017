"""The engine and SNOpt on CUDA (issue 13, point 6); skipped where no CUDA device is available.

Gradients on CUDA equal the CPU's (float64, same solver: the adaptive steps may differ by rounding
only), sampling works with the samples on the device, an SNOpt refresh and a plain iteration give
the CPU's preconditioned gradients, and the engine's host synchronisations per step do not grow.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import snopt_dyn
from snopt_dyn import hooks

sys.path.insert(0, os.path.dirname(__file__))
from test_sync_count import engine_step, snopt_step, total  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DT = torch.float64


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 32), nn.Linear(32, 3)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(torch.cat([z, torch.sin(t).expand(*z.shape[:-1], 1)], -1))))


class Record(hooks.EngineObserver):
    def __init__(self):
        self.batches = []

    def sample_spec(self, func):
        return hooks.SampleSpec(count=5)

    def on_samples(self, func, batch):
        self.batches.append(batch)


def _gradients(device, backend, method, sample):
    field = Field().to(device, DT)
    y0 = torch.randn(8, 3, dtype=DT, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT, requires_grad=True)  # on the CPU: moved once
    rec = Record()
    handle = hooks.register_observer(rec) if sample else None
    try:
        ys = snopt_dyn.odeint_adjoint(field, y0, t, rtol=1e-8, atol=1e-8, backend=backend, method=method)
        assert ys.device == y0.device
        (ys * torch.linspace(-1, 1, 3, dtype=DT, device=device)).sum().backward()
    finally:
        if handle:
            handle.remove()
    grads = [y0.grad, t.grad] + [p.grad for p in field.parameters()]
    return [g.detach().cpu() for g in grads], rec.batches


@pytest.mark.parametrize("backend,method", [("torchdiffeq", "dopri5"), ("torchdiffeq", "rk4"), ("torchdyn", "dopri5"),
                                            ("torchdyn", "tsit5")])
@pytest.mark.parametrize("sample", [False, True], ids=["plain", "sampled"])
def test_engine_gradients_on_cuda_equal_cpu(backend, method, sample):
    cpu, _ = _gradients("cpu", backend, method, sample)
    cuda, batches = _gradients("cuda", backend, method, sample)
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    if sample:
        (batch,) = batches
        for x in (batch.times, batch.weights, batch.states, batch.adjoints):
            assert x.device.type == "cuda"


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.field, self.head = Field(), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(snopt_dyn.odeint_adjoint(self.field, x, torch.tensor([0.0, 1.0]), rtol=1e-7, atol=1e-7)[-1])


def _snopt_grads(device):
    torch.manual_seed(2)
    model = Model().to(device, DT)
    precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=6)
    x = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(3)).to(device)
    out = []
    for _ in range(2):  # a refresh, then a plain iteration
        model.zero_grad()
        model(x).pow(2).mean().backward()
        precond.step()
        out.append([p.grad.detach().cpu().clone() for p in model.parameters()])
    return out


def test_snopt_refresh_and_plain_step_on_cuda_equal_cpu():
    for cuda, cpu in zip(_snopt_grads("cuda"), _snopt_grads("cpu")):
        for a, b in zip(cuda, cpu):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend,method", [("torchdiffeq", "dopri5"), ("torchdyn", "tsit5")])
def test_engine_syncs_on_cuda_do_not_grow(backend, method):
    (small, _), (large, _) = (engine_step("cuda", s, backend, method, sample=True) for s in (0, 1))
    print(f"\n[cuda syncs {backend}-{method}] engine {total(small, 'engine')} -> {total(large, 'engine')}, "
          f"library {total(small, 'library')} -> {total(large, 'library')}")
    assert total(large, "engine") == total(small, "engine") <= 3


@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "plain"])
def test_snopt_syncs_on_cuda(refresh):
    small, large = (snopt_step("cuda", s, refresh) for s in (0, 1))
    print(f"\n[cuda syncs SNOpt {'refresh' if refresh else 'plain'}] engine {total(small, 'engine')} -> "
          f"{total(large, 'engine')}; SNOpt {total(small, 'snopt')} -> {total(large, 'snopt')}")
    assert total(large, "engine") == total(small, "engine") <= 3

"""Host-device synchronisations of one training step do not grow with the problem (issue 13, point 4).

``Tensor.item/__float__/__bool__/__int__/tolist`` are patched to count their calls around one step
(forward, backward, and an SNOpt ``step()`` where used).  Each call is charged to the innermost
Python frame outside torch: the engine (``snopt_dyn`` engine modules), SNOpt (``preconditioner`` and
``curvature``), or a solver library (torchdiffeq, torchdyn: their step loops compare tensors by
design and are not ours to change).  The engine's count must be the same for a small and a large
problem (more output times, more solver steps, more samples); SNOpt's is printed with its lines.
On CUDA each of these calls waits for the device; on CPU the count is the same, so this test holds
the property without a GPU (tests/test_cuda.py runs it on CUDA where there is one).
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys

import pytest
import torch
from torch import nn

import snopt_dyn
from snopt_dyn import hooks

DT = torch.float64
_ENGINE = ("adjoint.py", "augmented.py", "sampling.py", "structure.py", "solvers.py", "hooks.py", "errors.py")
_PATCHED = ("item", "__float__", "__bool__", "__int__", "tolist")


def _owner(frame) -> str:
    """``"engine"``, ``"snopt"``, ``"library"`` or ``"other"`` for the frame that made the call."""
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "other"
    path = frame.f_code.co_filename
    where = f"{os.path.basename(path)}:{frame.f_lineno}"
    if f"{os.sep}snopt_dyn{os.sep}" in path:
        name = os.path.basename(path)
        if name in _ENGINE and f"{os.sep}curvature{os.sep}" not in path:
            return "engine " + where
        return "snopt " + where
    if "torchdiffeq" in path or "torchdyn" in path or "torchcde" in path:
        return "library " + where
    return "other " + where


@contextlib.contextmanager
def count_syncs():
    """Count the patched calls by owner and line: yields a ``Counter`` filled while inside."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _PATCHED}

    def patched(name):
        original = originals[name]

        def call(self, *args, **kwargs):
            counts[_owner(sys._getframe(1))] += 1
            return original(self, *args, **kwargs)
        return call

    for name in _PATCHED:
        setattr(torch.Tensor, name, patched(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def total(counts, owner: str) -> int:
    return sum(v for k, v in counts.items() if k.startswith(owner))


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 32), nn.Linear(32, 3)

    def forward(self, t, z):
        return self.l2(torch.tanh(self.l1(torch.cat([z, torch.sin(t).expand(*z.shape[:-1], 1)], -1))))


class Model(nn.Module):
    def __init__(self, times, backend, method, options, tol):
        super().__init__()
        self.field, self.head = Field(), nn.Linear(3, 2)
        self.t = torch.linspace(0.0, 1.0, times)
        self.kw = dict(backend=backend, method=method, options=options, rtol=tol, atol=tol)

    def forward(self, x):
        ys = snopt_dyn.odeint_adjoint(self.field, x, self.t.to(x), **self.kw)
        return self.head(ys).mean(0)  # every output time enters the loss


class Ask(hooks.EngineObserver):
    def __init__(self, count):
        self.count = count

    def sample_spec(self, func):
        return hooks.SampleSpec(count=self.count)


def engine_step(device, size, backend="torchdiffeq", method="dopri5", sample=True):
    """The engine's syncs in one training step: ``size`` 0 is small, 1 is large."""
    torch.manual_seed(0)
    times, tol, count = [(3, 1e-4, 4), (12, 1e-7, 24)][size]
    options = dict(step_size=[0.1, 0.01][size]) if method == "rk4" and backend == "torchdiffeq" else None
    model = Model(times, backend, method, options, tol).to(device, DT)
    if backend == "torchdyn" and method == "rk4":
        model.t = torch.linspace(0.0, 1.0, [3, 30][size])
    x = torch.randn(8, 3, dtype=DT, device=device)
    observer = Ask(count) if sample else None
    handle = hooks.register_observer(observer) if observer else None
    try:
        snopt_dyn.nfe.reset()
        with count_syncs() as counts:
            model(x).pow(2).sum().backward()
    finally:
        if handle:
            handle.remove()
    return counts, snopt_dyn.nfe.total


CASES = [("torchdiffeq", "dopri5"), ("torchdiffeq", "rk4"), ("torchdyn", "dopri5"), ("torchdyn", "tsit5"),
         ("torchdyn", "rk4")]


@pytest.mark.parametrize("backend,method", CASES, ids=[f"{b}-{m}" for b, m in CASES])
@pytest.mark.parametrize("sample", [False, True], ids=["plain", "sampled"])
def test_engine_syncs_do_not_grow_with_times_steps_or_samples(backend, method, sample, device="cpu"):
    (small, nfe_small), (large, nfe_large) = (engine_step(device, s, backend, method, sample) for s in (0, 1))
    assert nfe_large > 2 * nfe_small  # the large problem really takes more solver steps
    engine = {k: v for k, v in small.items() if k.startswith("engine")}
    print(f"\n[syncs {backend}-{method}-{'sampled' if sample else 'plain'}] engine {total(small, 'engine')} -> "
          f"{total(large, 'engine')}, library {total(small, 'library')} -> {total(large, 'library')} "
          f"(nfe {nfe_small} -> {nfe_large}); engine lines {dict(engine)}")
    assert total(large, "engine") == total(small, "engine")
    assert total(small, "engine") <= 3  # y0 finite check, t read once per solve, grad finite check


#: SNOpt's update rules (issue 20): today's, and Adam in the eigenbasis with every new option on
RULES = {"ekfac": {}, "adam": dict(rule="adam", beta1=0.9, factor_ema=0.5, burn_in=1, weight_decay=1e-3)}


def snopt_step(device, size, refresh, rule="ekfac"):
    """Syncs of one SNOpt training iteration (engine and SNOpt, by line)."""
    torch.manual_seed(0)
    times, tol, count = [(3, 1e-4, 4), (12, 1e-7, 24)][size]
    model = Model(times, "torchdiffeq", "dopri5", None, tol).to(device, DT)
    precond = snopt_dyn.SNOpt(model, update_freq=2, num_samples=count, **RULES[rule])
    x = torch.randn(8, 3, dtype=DT, device=device)
    if not refresh:  # a refresh first, then count the plain iteration after it
        model(x).pow(2).sum().backward()
        precond.step()
        model.zero_grad()
    assert precond.refreshing == refresh
    with count_syncs() as counts:
        model(x).pow(2).sum().backward()
        precond.step()
    return counts


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "plain"])
def test_snopt_iteration_engine_syncs_are_bounded(refresh, rule, device="cpu"):
    small, large = (snopt_step(device, s, refresh, rule) for s in (0, 1))
    snopt_lines = {k: v for k, v in large.items() if k.startswith("snopt")}
    print(f"\n[syncs SNOpt {rule} {'refresh' if refresh else 'plain'}] engine {total(small, 'engine')} -> "
          f"{total(large, 'engine')}; SNOpt {total(small, 'snopt')} -> {total(large, 'snopt')}; "
          f"SNOpt lines (large) {dict(sorted(snopt_lines.items()))}")
    assert total(large, "engine") == total(small, "engine") <= 3
    if rule != "ekfac":  # no host sync added by the new rule: SNOpt's own count is today's
        today = snopt_step(device, 1, refresh)
        assert total(large, "snopt") == total(today, "snopt")

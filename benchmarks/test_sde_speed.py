"""SDE adjoint speed: one training step on ``snopt_dyn.sdeint_adjoint`` vs ``torchsde.sdeint_adjoint``.

One step = ``zero_grad`` + a fresh ``torchsde.BrownianInterval`` (same ``entropy`` and ``dt`` hint on
both sides, so both solve on the same Brownian path) + forward + loss + ``backward()``; no optimizer
step, so every round solves the same problem.  The SDE is a torchsde module with diagonal noise,
tanh-MLP drift and sigmoid-MLP diffusion on a float64 state, ``ts = [0, 1]``, fixed ``dt``.
Both sides use the same SDE module, ``method``, ``adjoint_method`` and ``dt``:

* ``reversible_heun``: Stratonovich, ``adjoint_reversible_heun`` (the algebraically reversible pair);
* ``midpoint``: Stratonovich, continuous adjoint SDE solved by ``midpoint`` (torchsde's default);
* ``euler-ito``: Itô, ``euler`` forward, continuous adjoint by ``milstein`` (torchsde's default);
* ``wrapped-reversible_heun``: user code calling ``torchsde.sdeint_adjoint`` inside a model, through
  ``snopt_dyn.wrap(model)`` (engine) vs the same wrapped model inside ``snopt_dyn.no_interception()``
  (torchsde's own solver).

The sides take turns round by round in one process (``interleaved``); the ratio is the median of the
per-round ``engine / torchsde`` ratios.  Asserted in every mode: losses and gradients (``y0`` and
every parameter) are equal bit for bit between the sides, the engine really ran on its side (its
autograd node is in the loss's graph) and not on the other, and the ratios are finite and positive.
Target (measured, not asserted): engine step time <= torchsde's.
"""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import nn

from snopt_dyn_bench import finite_positive, interleaved, median, paired_ratio, pick

torchsde = pytest.importorskip("torchsde")
import snopt_dyn  # noqa: E402
from sde_helpers import engine_used  # noqa: E402  (tests/ is on pytest's pythonpath)

SEED = 7
CASES = {  # name: (sde_type, method, adjoint_method, through wrap)
    "reversible_heun": ("stratonovich", "reversible_heun", "adjoint_reversible_heun", False),
    "midpoint": ("stratonovich", "midpoint", "midpoint", False),
    "euler-ito": ("ito", "euler", "milstein", False),
    "wrapped-reversible_heun": ("stratonovich", "reversible_heun", "adjoint_reversible_heun", True),
}


class SDE(nn.Module):
    noise_type = "diagonal"

    def __init__(self, sde_type: str, channels: int, width: int):
        super().__init__()
        self.sde_type = sde_type
        self.drift = nn.Sequential(nn.Linear(channels, width), nn.Tanh(), nn.Linear(width, channels))
        self.diffusion = nn.Sequential(nn.Linear(channels, width), nn.Tanh(), nn.Linear(width, channels), nn.Sigmoid())

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return self.diffusion(y)


class Model(nn.Module):
    """User code: ``torchsde.sdeint_adjoint`` on its SDE, looked up at call time (as users write it)."""

    def __init__(self, sde: SDE, **solve_kwargs):
        super().__init__()
        self.sde, self.solve_kwargs = sde, solve_kwargs

    def forward(self, y0, ts, bm):
        return torchsde.sdeint_adjoint(self.sde, y0, ts, bm=bm, **self.solve_kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_sde_adjoint_speed(benchmark, record, case):
    sde_type, method, adjoint_method, wrapped = CASES[case]
    rows, channels, width = pick((64, 16, 32), (256, 32, 64))
    dt, rounds = pick(0.05, 0.01), pick(4, 15)
    torch.manual_seed(0)
    sde = SDE(sde_type, channels, width).double()
    y0 = torch.randn(rows, channels, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kwargs = dict(method=method, adjoint_method=adjoint_method, dt=dt)
    if wrapped:
        model = snopt_dyn.wrap(Model(sde, **kwargs))
        params = list(model.parameters())
        solves = {"engine": lambda bm: model(y0, ts, bm), "torchsde": lambda bm: _native(model, y0, ts, bm)}
    else:
        params = list(sde.parameters())
        solves = {"engine": lambda bm: snopt_dyn.sdeint_adjoint(sde, y0, ts, bm=bm, **kwargs),
                  "torchsde": lambda bm: torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, **kwargs)}
    results: Dict[str, List[tuple]] = {k: [] for k in solves}

    def make_step(name):
        def step():
            for p in params:
                p.grad = None
            y0.grad = None
            bm = torchsde.BrownianInterval(0.0, 1.0, size=(rows, channels), dtype=torch.float64, entropy=SEED, dt=dt)
            loss = solves[name](bm)[-1].pow(2).mean()
            loss.backward()
            if not results[name]:  # the first call of each side: what the asserts compare
                grads = [y0.grad.clone()] + [p.grad.clone() for p in params]
                results[name].append((loss.detach(), grads, engine_used(loss)))
        return step

    times = interleaved(benchmark, {k: make_step(k) for k in solves}, measured="engine", rounds=rounds, warmup=1)
    ratio = paired_ratio(times["engine"], times["torchsde"])
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    what = (f"{sde_type} diagonal SDE {rows}x{channels} float64, MLP width {width}, {method} + {adjoint_method}, "
            f"dt {dt:g} ({round(1 / dt)} steps){', through wrap' if wrapped else ''}")
    lines = [f"{case}: {what}; step time engine {ms['engine']:.1f} ms, torchsde {ms['torchsde']:.1f} ms",
             f"{case}: engine/torchsde = {ratio['median']:.3f} (IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}, "
             f"min {ratio['min']:.3f}, max {ratio['max']:.3f}, {ratio['rounds']} rounds; target <= 1: "
             f"{'met' if ratio['median'] <= 1 else 'MISSED'})"]
    record(f"sde_adjoint_speed[{case}]", dict(
        case=case, model=what, sde_type=sde_type, method=method, adjoint_method=adjoint_method, dt=dt,
        wrapped=wrapped, step_ms_median=ms, ratio_engine_over_torchsde=ratio, target="engine <= torchsde",
        target_met=ratio["median"] <= 1, times_s=times), lines)

    assert all(len(v) == rounds for v in times.values())
    assert all(finite_positive(t) for v in times.values() for t in v)
    assert finite_positive(ratio["median"])
    (loss_e, grads_e, on_engine), = results["engine"]
    (loss_t, grads_t, on_torchsde), = results["torchsde"]
    assert on_engine and not on_torchsde, "each side ran on the solver it names"
    assert torch.equal(loss_e, loss_t)
    for name, a, b in zip(["y0"] + [f"param{i}" for i in range(len(params))], grads_e, grads_t):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())


def _native(model, y0, ts, bm):
    with snopt_dyn.no_interception():
        return model(y0, ts, bm)

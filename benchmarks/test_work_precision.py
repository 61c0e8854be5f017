"""Work-precision: one training step's time against its gradient error, native adjoint vs the engine.

Replaces "step time at equal tolerance" (issue 13, point 3): a looser solve is faster and less
accurate, so speed is compared at equal *accuracy*.  For each library and each tolerance
(rtol = atol, 1e-3 ... 1e-7, dopri5 forward and backward) one training step (zero_grad, forward,
loss, backward) is timed, the sides taking turns round by round, and its parameter gradient is
compared with a float64 backprop reference through the same field at rtol = atol = 1e-10:

* torchdiffeq: sklearn digits, Linear encoder -> MLP field -> Linear head, ``odeint_adjoint``;
* torchcde: the canonical Neural CDE on JapaneseVowels (Hermite cubic spline), ``cdeint(adjoint=True)``;
* torchdyn: a conv ``NeuralODE(sensitivity="adjoint")`` on MNIST (the image task's 8-16-8 field).

Sides: ``native`` (the library's adjoint, its default norm), ``native+seminorm`` (torchdiffeq and
torchcde: ``adjoint_options={"norm": "seminorm"}``), ``ours`` (``snopt_dyn.wrap(seminorm=False)``:
the engine with torchdiffeq's default norm) and ``ours+seminorm`` (``wrap(seminorm=True)``).
Everything runs in float64 so that the errors show the solver, not float32 rounding.

The full run takes ~11 minutes on 2 cores (the CDE at 1e-7 needs ~10^4 evaluations per step; the
figures of BENCHMARKS.md were measured with 15/3/7 rounds, 16 minutes).  Quick mode (one
tolerance, tiny batches, ~10 s) asserts well-formedness only and prints nothing; ``SNOPT_DYN_BENCH=full`` prints the
points and, per library, who is fastest at each accuracy.  ``benchmarks/plot_work_precision.py``
draws ``docs/work_precision.png`` and the markdown table from the recorded JSON.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List

import pytest
import torch
import torchdiffeq
from torch import nn
from torch.nn import functional as F

import snopt_dyn
from snopt_dyn import datasets
from snopt_dyn.models import CDEFunc

from snopt_dyn_bench import MLPField, finite_positive, interleaved, median, paired_ratio, pick

DT = torch.float64
TOLS = pick([1e-3], [1e-3, 1e-4, 1e-5, 1e-6, 1e-7])
REF_TOL = pick(1e-6, 1e-10)  # quick mode checks the plumbing only
LEVELS = [10.0 ** -k for k in range(1, 9)]  # accuracy levels of the table


# ----------------------------------------------------------------------------------- models
class DigitsODE(nn.Module):
    """User code: Linear encoder -> ``torchdiffeq.odeint_adjoint`` on [0, 1] -> Linear head."""

    def __init__(self, hidden, width, tol, adjoint_options=None, backprop=False):
        super().__init__()
        self.encoder, self.field, self.head = nn.Linear(64, hidden), MLPField(hidden, width), nn.Linear(hidden, 10)
        self.tol, self.adjoint_options, self.backprop = tol, adjoint_options, backprop
        self.register_buffer("t", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x):
        z0 = self.encoder(x)
        if self.backprop:
            z = torchdiffeq.odeint(self.field, z0, self.t, method="dopri5", rtol=self.tol, atol=self.tol)
        else:
            z = torchdiffeq.odeint_adjoint(self.field, z0, self.t, method="dopri5", rtol=self.tol, atol=self.tol,
                                           adjoint_options=self.adjoint_options)
        return self.head(z[-1])


class CDE(nn.Module):
    """User code: torchcde's canonical Neural CDE classifier."""

    def __init__(self, channels, hidden, classes, width, tol, adjoint_options=None, backprop=False):
        super().__init__()
        self.initial, self.func = nn.Linear(channels, hidden), CDEFunc(channels, hidden, width)
        self.readout = nn.Linear(hidden, classes)
        self.tol, self.adjoint_options, self.backprop = tol, adjoint_options, backprop

    def forward(self, coeffs):
        import torchcde
        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        kw = dict(method="dopri5", rtol=self.tol, atol=self.tol)
        if not self.backprop:
            kw["adjoint_options"] = self.adjoint_options
        z = torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=not self.backprop, **kw)
        return self.readout(z[:, -1])


class ConvField(nn.Module):
    """The image task's conv field: 8 -> 16 -> 8 channels, softplus then tanh."""

    def __init__(self, channels=8, width=16):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, t, x, args=None):
        return torch.tanh(self.conv2(F.softplus(self.conv1(x))))


class ImageODE(nn.Module):
    """Conv stem -> torchdyn ``NeuralODE`` (dopri5, adjoint) -> pooling -> Linear."""

    def __init__(self, tol, backprop=False):
        super().__init__()
        from torchdyn.core import NeuralODE
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Softplus())
        self.node = NeuralODE(ConvField(), solver="dopri5", sensitivity="adjoint", rtol=tol, atol=tol,
                              solver_adjoint="dopri5", rtol_adjoint=tol, atol_adjoint=tol, return_t_eval=False)
        self.backprop = backprop  # the reference: the same field, backprop through torchdiffeq's dopri5
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))
        self.tol = tol
        self.register_buffer("t_span", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x):
        h = self.stem(x)
        if self.backprop:
            field = next(m for m in self.node.modules() if isinstance(m, ConvField))
            z = torchdiffeq.odeint(field, h, self.t_span, method="dopri5", rtol=self.tol, atol=self.tol)[-1]
        else:
            z = self.node(h, self.t_span)[-1]
        return self.head(z)


# ------------------------------------------------------------------------------------- cases
def _digits():
    x, y = datasets.load_digits("train", flatten=True)
    n = pick(32, 128)
    hidden, width = pick((16, 32), (32, 64))
    x, y = x[:n].to(DT), y[:n]
    build = lambda tol, **kw: DigitsODE(hidden, width, tol, **kw)
    return dict(build=build, data=(x, y), seminorm=True, field=MLPField, rounds=pick(1, 10),
                what=f"digits MLP field {hidden}-{width}-{hidden}, batch {n}")


def _vowels():
    cde = pytest.importorskip("torchcde")
    train = datasets.load_japanese_vowels("train", standardize=True)
    n = pick(4, 8)
    index = torch.linspace(0, len(train.labels) - 1, n).round().long()  # spread over the class-sorted set
    path = datasets.with_time_channel(train, time_scale=float(train.values.shape[1] - 1))[index].to(DT)
    coeffs = cde.hermite_cubic_coefficients_with_backward_differences(path)
    hidden = pick(8, 16)  # the backward at 1e-7 takes ~10^4 evaluations (the spline's knots)
    build = lambda tol, **kw: CDE(path.shape[-1], hidden, train.num_classes, 64, tol, **kw)
    return dict(build=build, data=(coeffs, train.labels[index]), seminorm=True, field=CDEFunc, rounds=pick(1, 2),
                what=f"JapaneseVowels Neural CDE hidden {hidden}, batch {n}")


def _mnist():
    pytest.importorskip("torchdyn")
    x, y = datasets.load_mnist_subset("train")
    n = pick(2, 16)
    x, y = x[:n].to(DT), y[:n]

    def build(tol, adjoint_options=None, backprop=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageODE(tol, backprop=backprop)
    return dict(build=build, data=(x, y), seminorm=False, field=ConvField, rounds=pick(1, 5),
                what=f"MNIST conv Neural ODE (8-16-8), batch {n}")


CASES: Dict[str, Callable[[], dict]] = {"torchdiffeq": _digits, "torchcde": _vowels, "torchdyn": _mnist}
_cache: Dict[str, dict] = {}


def _case(library: str) -> dict:
    """The case with its float64 backprop reference gradient (computed once per library)."""
    if library not in _cache:
        case = CASES[library]()
        torch.manual_seed(0)
        ref_model = case["build"](REF_TOL, backprop=True).to(DT)
        case["state"] = {k: v.clone() for k, v in ref_model.state_dict().items()}
        case["reference"] = _gradient(ref_model, case["data"])
        _cache[library] = case
    return _cache[library]


def _gradient(model: nn.Module, data) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    x, y = data
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _sides(case: dict, tol: float) -> Dict[str, nn.Module]:
    def build(**kw):
        torch.manual_seed(0)
        model = case["build"](tol, **kw).to(DT)
        model.load_state_dict(case["state"])
        return model
    sides = {"native": build()}
    if case["seminorm"]:
        sides["native+seminorm"] = build(adjoint_options={"norm": "seminorm"})
    sides["ours"] = snopt_dyn.wrap(build(), seminorm=False)
    sides["ours+seminorm"] = snopt_dyn.wrap(build(), seminorm=True)
    return sides


def _same_weights(models, state):
    names = {k for k in state}
    for m in models.values():
        for k, v in m.state_dict().items():
            if k in names and v.shape == state[k].shape:
                assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("library", list(CASES))
def test_work_precision(benchmark, record, library):
    """Every (side, tolerance) of one library takes its turn in every round: the host's speed drifts
    by up to 1.6x over minutes, so points measured one after the other could not be compared."""
    case = _case(library)
    models = {(side, tol): model for tol in TOLS for side, model in _sides(case, tol).items()}
    _same_weights(models, case["state"])
    grads, nfe, counters = {}, {}, {}
    for key, model in models.items():
        calls = counters[key] = [0]
        field = next(m for m in model.modules() if isinstance(m, case["field"]))
        field.register_forward_pre_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))

    def step(key):
        counters[key][0] = 0
        grads[key] = _gradient(models[key], case["data"])
        nfe[key] = counters[key][0]

    names = {f"{side}@{tol:.0e}": (side, tol) for side, tol in models}
    steps = {name: (lambda key=key: step(key)) for name, key in names.items()}
    times = interleaved(benchmark, steps, measured=f"ours@{TOLS[0]:.0e}", rounds=case["rounds"], warmup=0)
    ref = case["reference"]
    points: Dict[str, Dict[float, dict]] = {}
    for name, (side, tol) in names.items():
        points.setdefault(side, {})[tol] = dict(error=float((grads[side, tol] - ref).norm() / ref.norm()),
                                                ms=1e3 * median(times[name]), nfe=nfe[side, tol])
    # same tolerance, same norm: the per-round ratio of step times
    pairs = {f"{o}/{n}@{tol:.0e}": paired_ratio(times[f"{o}@{tol:.0e}"], times[f"{n}@{tol:.0e}"])["median"]
             for tol in TOLS for n, o in (("native", "ours"), ("native+seminorm", "ours+seminorm")) if n in points}
    lines = [f"{library}: {case['what']}"]
    lines += [f"{library} tol {tol:.0e}: " + ", ".join(
        f"{side} {by_tol[tol]['ms']:.1f} ms err {by_tol[tol]['error']:.2e} nfe {by_tol[tol]['nfe']}"
        for side, by_tol in points.items()) for tol in TOLS]
    lines.append(f"{library} paired ours/native: " + ", ".join(f"{k} {v:.2f}" for k, v in pairs.items()))
    lines.append(f"{library}: | gradient error | " + " | ".join(points) + " | fastest |")
    lines += [f"{library}: {row}" for row in table_rows(points)]
    record(f"work_precision[{library}]", dict(library=library, model=case["what"], tols=TOLS, points=points,
                                              paired_ratios=pairs, times_s=times), lines)
    assert all(math.isfinite(p["error"]) and p["error"] >= 0 for by in points.values() for p in by.values())
    assert all(finite_positive(t) for v in times.values() for t in v)
    assert all(n > 0 for n in nfe.values()) and all(finite_positive(v) for v in pairs.values())


def fastest_at(points: Dict[str, Dict[float, dict]], level: float) -> Dict[str, float]:
    """Per side, the least step time among its tolerances whose gradient error is <= ``level``."""
    out = {}
    for side, by_tol in points.items():
        ok = [p["ms"] for p in by_tol.values() if p["error"] <= level]
        if ok:
            out[side] = min(ok)
    return out


def table_rows(points: Dict[str, Dict[float, dict]]) -> List[str]:
    """Markdown rows ``| accuracy | side ms ... | fastest |`` for the levels some side reaches."""
    sides = list(points)
    rows = []
    worst = max(p["error"] for by_tol in points.values() for p in by_tol.values())
    for level in LEVELS:
        best = fastest_at(points, level)
        if not best or level > 10 * worst:
            continue
        cells = [f"{best[s]:.0f}" if s in best else "—" for s in sides]
        rows.append(f"| <= {level:.0e} | " + " | ".join(cells) + f" | {min(best, key=best.get)} |")
    return rows

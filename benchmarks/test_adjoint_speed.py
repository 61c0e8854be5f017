"""Adjoint speed: one training step of a model through ``snopt_dyn.wrap`` vs the library's own adjoint.

One step = ``zero_grad`` + forward + loss + ``backward()`` (no optimizer step, so every round solves
the same problem on both sides and the comparison is not blurred by diverging weights).  Same model
(same seed, same weights), same batch, same solver and tolerances (dopri5, rtol = atol = 1e-3):

* torchdiffeq: a user model calling ``torchdiffeq.odeint_adjoint`` (sklearn digits, MLP field);
* torchcde: the canonical Neural CDE, ``torchcde.cdeint(adjoint=True)`` (JapaneseVowels, the
  ``timeseries`` task's architecture);
* torchdyn: the ``image`` task's conv Neural ODE, ``NeuralODE(sensitivity="adjoint")`` (MNIST).

Sides: ``native`` (the library as users call it: torchdiffeq/torchcde's default full norm for the
backward error control; torchdyn has no seminorm option), ``wrapped`` (``snopt_dyn.wrap`` with its
defaults, seminorm on) and a like-for-like pair -- ``native+seminorm``
(``adjoint_options={"norm": "seminorm"}``) for torchdiffeq/torchcde, ``wrapped-fullnorm``
(``wrap(seminorm=False)``) for torchdyn -- so that the algorithmic gain of the seminorm and the
implementation's speed can be told apart.  Field evaluations are counted by a hook on the field
(the same count for every side, whoever calls it).

Target (measured, not asserted): wrapped step time <= native step time on each library.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import pytest
import torch
import torchdiffeq
from torch import nn
from torch.nn import functional as F

import snopt_dyn
from snopt_dyn import datasets
from snopt_dyn.compare import get_task
from snopt_dyn.compare.tasks.image import ConvField, build_image_model
from snopt_dyn.models import CDEFunc

from snopt_dyn_bench import MLPField, finite_positive, interleaved, median, paired_ratio, pick

TOL = 1e-3


class FieldCounter:
    """Counts calls of a field module (a forward pre-hook), split by the pass they happen in."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


def _find(model: nn.Module, cls) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, cls))


# ----------------------------------------------------------------------------------- models
class DigitsODE(nn.Module):
    """User code: Linear encoder -> ``torchdiffeq.odeint_adjoint`` on [0, 1] -> Linear head."""

    def __init__(self, hidden: int, width: int, adjoint_options=None):
        super().__init__()
        self.encoder = nn.Linear(64, hidden)
        self.field = MLPField(hidden, width)
        self.head = nn.Linear(hidden, 10)
        self.adjoint_options = adjoint_options
        self.register_buffer("t", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x):
        z = torchdiffeq.odeint_adjoint(self.field, self.encoder(x), self.t, method="dopri5", rtol=TOL, atol=TOL,
                                       adjoint_options=self.adjoint_options)
        return self.head(z[-1])


class CDE(nn.Module):
    """User code: the ``timeseries`` task's Neural CDE, with the adjoint options exposed."""

    def __init__(self, channels: int, hidden: int, classes: int, width: int, adjoint_options=None):
        super().__init__()
        self.initial = nn.Linear(channels, hidden)
        self.func = CDEFunc(channels, hidden, width)
        self.readout = nn.Linear(hidden, classes)
        self.adjoint_options = adjoint_options

    def forward(self, coeffs):
        import torchcde
        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        z = torchcde.cdeint(X=X, func=self.func, z0=z0, t=X.interval, adjoint=True, method="dopri5",
                            rtol=TOL, atol=TOL, adjoint_options=self.adjoint_options)
        return self.readout(z[:, -1])


# ------------------------------------------------------------------------------------- cases
def _case_torchdiffeq():
    x, y = datasets.load_digits("train", flatten=True)
    n = pick(64, 128)
    x, y = x[:n], y[:n]
    hidden, width = pick((32, 64), (64, 128))

    def build(adjoint_options=None):
        torch.manual_seed(0)
        return DigitsODE(hidden, width, adjoint_options)

    sides = {"native": build(), "native+seminorm": build({"norm": "seminorm"}), "wrapped": snopt_dyn.wrap(build())}
    return dict(sides=sides, field=MLPField, loss=lambda m: F.cross_entropy(m(x), y),
                what=f"digits MLP field {hidden}-{width}-{hidden}, batch {n}", rounds=pick(4, 30))


def _case_torchcde():
    pytest.importorskip("torchcde")
    task = get_task("timeseries").prepare("cpu")
    n = pick(8, 32)
    index = torch.linspace(0, task.n_train - 1, n).round().long()  # spread over the (class-sorted) set
    coeffs, y = task.train_x[index], task.train_y[index]
    info = task.info
    hidden = pick(16, 32)

    def build(adjoint_options=None):
        torch.manual_seed(0)
        return CDE(info["channels"], hidden, info["num_classes"], 64, adjoint_options)

    sides = {"native": build(), "native+seminorm": build({"norm": "seminorm"}), "wrapped": snopt_dyn.wrap(build())}
    return dict(sides=sides, field=CDEFunc, loss=lambda m: F.cross_entropy(m(coeffs), y),
                what=f"JapaneseVowels Neural CDE hidden {hidden}, batch {n}", rounds=pick(3, 15))


def _case_torchdyn():
    pytest.importorskip("torchdyn")
    x, y = datasets.load_mnist_subset("train")
    n = pick(8, 64)
    x, y = x[:n], y[:n]

    def build():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_image_model()

    sides = {"native": build(), "wrapped-fullnorm": snopt_dyn.wrap(build(), seminorm=False),
             "wrapped": snopt_dyn.wrap(build())}
    return dict(sides=sides, field=ConvField, loss=lambda m: F.cross_entropy(m(x), y),
                what=f"MNIST conv Neural ODE (8-16-8), batch {n}", rounds=pick(3, 15))


CASES: Dict[str, Callable[[], dict]] = {"torchdiffeq": _case_torchdiffeq, "torchcde": _case_torchcde,
                                        "torchdyn": _case_torchdyn}


@pytest.mark.parametrize("library", list(CASES))
def test_adjoint_speed(benchmark, record, library):
    case = CASES[library]()
    models: Dict[str, nn.Module] = case["sides"]
    first = models["native"].state_dict()
    for m in models.values():  # the same weights on every side
        assert all(torch.equal(v, first[k]) for k, v in m.state_dict().items())
    nfe: Dict[str, List[tuple]] = {k: [] for k in models}
    losses: Dict[str, List[float]] = {k: [] for k in models}
    steps = {}
    for name, model in models.items():
        counter = FieldCounter(_find(model, case["field"]))

        def step(model=model, counter=counter, name=name):
            model.zero_grad(set_to_none=True)
            counter.calls = 0
            loss = case["loss"](model)
            forward = counter.calls
            loss.backward()
            nfe[name].append((forward, counter.calls - forward))
            losses[name].append(float(loss.detach()))

        steps[name] = step

    times = interleaved(benchmark, steps, measured="wrapped", rounds=case["rounds"], warmup=1)
    pair = "native+seminorm" if "native+seminorm" in models else "wrapped-fullnorm"
    ratio = paired_ratio(times["wrapped"], times["native"])
    like = paired_ratio(times["wrapped"], times["native+seminorm"]) if pair == "native+seminorm" else \
        paired_ratio(times["wrapped-fullnorm"], times["native"])
    nfe_med = {k: (median([a for a, _ in v]), median([b for _, b in v])) for k, v in nfe.items()}
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    lines = [f"{library}: {case['what']}; step time " +
             ", ".join(f"{k} {ms[k]:.1f} ms (NFE {nfe_med[k][0]:.0f}+{nfe_med[k][1]:.0f})" for k in models),
             f"{library}: wrapped/native = {ratio['median']:.3f} (IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}, "
             f"{ratio['rounds']} rounds; target <= 1: {'met' if ratio['median'] <= 1 else 'MISSED'}); "
             f"like-for-like ({'wrapped/native+seminorm' if pair == 'native+seminorm' else 'wrapped-fullnorm/native'})"
             f" = {like['median']:.3f}"]
    record(f"adjoint_speed[{library}]", dict(
        library=library, model=case["what"], solver="dopri5", rtol=TOL, atol=TOL,
        step_ms_median=ms, nfe_forward_backward_median=nfe_med, ratio_wrapped_over_native=ratio,
        like_for_like=dict(pair=pair, **like), target="wrapped <= native", target_met=ratio["median"] <= 1,
        times_s=times), lines)

    # what is asserted in every mode: the measurement is well formed and both sides run one model
    assert all(len(v) == case["rounds"] for v in times.values())
    assert all(finite_positive(t) for v in times.values() for t in v)
    assert finite_positive(ratio["median"]) and finite_positive(like["median"])
    assert all(f > 0 and b > 0 for v in nfe.values() for f, b in v), "every side evaluates its field both ways"
    ref = losses["native"][0]
    for name, vals in losses.items():  # the same forward solve (same solver, tolerances, weights, batch)
        assert abs(vals[0] - ref) <= 1e-4 * max(1.0, abs(ref)), (name, vals[0], ref)

"""The robust verdict (snopt_dyn.compare.verdict / summary): synthetic curves with a known answer."""
from __future__ import annotations

import math

import pytest
import torch

from snopt_dyn.compare import CompareResult, Run, format_table, summarize
from snopt_dyn.compare.verdict import plateau, seed_verdict, smoothed, time_to_reach, value_at, verdict_text


def test_plateau_is_the_mean_of_the_last_third():
    curve = [(t, v) for t, v in enumerate([0.1, 0.2, 0.3, 0.6, 0.9, 0.9])]
    assert plateau(curve) == pytest.approx(0.9)
    assert plateau([(1, 0.5)]) == 0.5 and plateau([]) is None
    assert plateau([(t, v) for t, v in enumerate([1, 2, 3, 4, 5, 6, 7])]) == pytest.approx(6.0)  # ceil(7/3)=3


def test_a_lucky_spike_does_not_count_as_reaching_the_target():
    spiky = [(1, 0.5), (2, 0.95), (3, 0.5), (4, 0.6), (5, 0.9), (6, 0.92), (7, 0.93)]
    assert time_to_reach(spiky, 0.9, higher=True) == 7  # not 2: the mean of 3 around the spike is 0.65
    assert [round(v, 4) for _, v in smoothed(spiky)][:2] == [0.65, 0.6833]
    assert time_to_reach(spiky, 0.99, higher=True) is None
    assert time_to_reach([(1, 3.0), (2, 2.0), (3, 1.0)], 2.0, higher=False) == 3  # lower is better
    # measured on the image task: the plateau (mean of the last 4 of 12) is above every window of 3
    noisy = list(enumerate([0.31, 0.63, 0.76, 0.83, 0.87, 0.898, 0.908, 0.906, 0.934, 0.912, 0.914, 0.926], start=1))
    assert plateau(noisy) == pytest.approx(0.9215) and max(v for _, v in smoothed(noisy)) < 0.9215
    assert time_to_reach(noisy, plateau(noisy), higher=True) == 12  # reached at its last evaluation
    assert value_at(spiky, 4.5) == pytest.approx((0.95 + 0.5 + 0.6) / 3) and value_at(spiky, 0.5) is None


def test_seed_verdict_target_is_the_best_baseline_plateau_and_ratio_uses_the_fastest_baseline():
    rise = lambda speed, top: [(t, min(top, 0.3 + speed * t)) for t in range(1, 31)]  # noqa: E731
    curves = {"snopt": rise(0.2, 0.9), "adam": rise(0.05, 0.9), "sgd": rise(0.1, 0.85)}
    v = seed_verdict(curves, "snopt", ["adam", "sgd"], higher=True)
    assert v.best_baseline == "adam" and v.target == pytest.approx(0.9)  # adam's last third sits at 0.9
    assert v.fastest_baseline == "adam" and v.times["sgd"] is None  # sgd never reaches adam's plateau
    assert v.times["snopt"] == 5 and v.times["adam"] == 14  # the third value at 0.9 in a row
    assert v.ratio == pytest.approx(5 / 14)
    curves["snopt"] = [(t, 0.8) for t in range(1, 31)]  # never reaches: infinitely slow
    assert math.isinf(seed_verdict(curves, "snopt", ["adam", "sgd"], higher=True).ratio)


def test_the_verdict_never_says_faster_below_the_best_baseline_plateau():
    text = verdict_text((0.5, 0.4, 0.6), snopt_plateau=0.90, best_plateau=0.92, best="soap", higher=True, seeds=3)
    assert "not faster" in text and "0.50x" in text
    text = verdict_text((0.5, 0.4, 0.6), snopt_plateau=0.93, best_plateau=0.92, best="soap", higher=True, seeds=3)
    assert ": faster" in text
    text = verdict_text((0.5, 0.4, 0.6), snopt_plateau=-3.0, best_plateau=-3.5, best="adam", higher=False, seeds=3)
    assert "not faster" in text  # an NLL of -3.0 is worse than -3.5
    assert "not faster" in verdict_text((1.3, 1.1, 1.5), 0.95, 0.92, "adam", True, 3)


class _FakeTask:
    name, description, metric, higher_is_better = "fake", "fake", "accuracy", True
    device = torch.device("cpu")
    info = {}


def _run(name, kind, seed, curve):
    run = Run(name=name, kind=kind, lr=0.1, model=None, optimizer=None, precond=None, generator=None,
              batch_size=1, n_train=1, seed=seed)
    run.rows.append(dict(optimizer=name, iteration=0, train_clock_s=0.0, train_loss=None, test_metric=0.1,
                         nfe_forward=0, nfe_backward=0, sampling_nfe=0))
    for i, (clock, metric) in enumerate(curve, start=1):
        run.rows.append(dict(optimizer=name, iteration=i, train_clock_s=clock, train_loss=1 - metric,
                             test_metric=metric, nfe_forward=1, nfe_backward=2, sampling_nfe=0))
    run.iters, run.clock = len(curve), curve[-1][0]
    run.nfe_forward, run.nfe_backward = run.iters, 2 * run.iters
    return run


def _seed(seed, snopt_speed, adam_speed, snopt_top=0.95):
    curve = lambda speed, top: [(t, min(top, 0.2 + speed * t)) for t in range(1, 21)]  # noqa: E731
    runs = [_run("snopt", "snopt", seed, curve(snopt_speed, snopt_top)), _run("adam", "adam", seed, curve(adam_speed, 0.9))]
    return CompareResult(task=_FakeTask(), runs=runs, settings={"budget_s": 20.0, "seed": seed})


def test_summary_takes_medians_over_seeds_and_keeps_every_seed():
    results = [_seed(0, 0.2, 0.05), _seed(1, 0.1, 0.05), _seed(2, 0.04, 0.05)]  # the third seed: SNOpt slower
    summary = summarize(results)
    ratios = [s["ratio"] for s in summary["per_seed"]]
    assert len(ratios) == 3 and ratios[0] < ratios[1] < 1 < ratios[2]
    assert summary["verdict"]["ratio"][0] == pytest.approx(sorted(ratios)[1])  # the median, not the lucky seed
    assert summary["verdict"]["faster"] and ": faster" in summary["verdict"]["text"]
    snopt = next(o for o in summary["optimizers"] if o["optimizer"] == "snopt")
    assert snopt["seeds"] == 3 and snopt["reached"] == 3
    assert snopt["plateau"][1] <= snopt["plateau"][0] <= snopt["plateau"][2]
    assert summary["verdict"]["loss_ratio"] is not None  # the same verdict on the training loss
    text = format_table(results, summary)
    assert "medians over 3 seeds" in text and "verdict (training loss)" in text
    # SNOpt faster but ending lower: never "faster"
    low = summarize([_seed(s, 0.2, 0.05, snopt_top=0.85) for s in range(3)])
    assert not low["verdict"]["faster"] and "not faster" in low["verdict"]["text"]


def test_an_explicit_target_applies_to_every_seed():
    summary = summarize([_seed(0, 0.2, 0.05), _seed(1, 0.2, 0.05)], target=0.99)
    assert all(s["target"] == 0.99 for s in summary["per_seed"])
    assert summary["verdict"]["ratio"] is None and "no verdict" in summary["verdict"]["text"]


class _LabelledTask(_FakeTask):
    """A classification task whose labels say what always predicting one class scores."""

    def __init__(self, train_y, test_y):
        self.train_y, self.test_y = torch.tensor(train_y), torch.tensor(test_y)


def _with_task(task, seeds=3):
    results = [_seed(s, 0.2, 0.05) for s in range(seeds)]  # adam's plateau, the target: 0.90
    for r in results:
        r.task = task
    return results


def test_a_target_near_the_majority_class_rate_warns_that_the_verdict_compares_noise():
    # the training set's most frequent class is 1; it is 89 of 100 test labels: the target (0.90) is near it
    near = _LabelledTask([1, 1, 0], [1] * 89 + [0] * 11)
    summary = summarize(_with_task(near))
    verdict = summary["verdict"]
    assert verdict["majority_rate"] == pytest.approx(0.89) and verdict["near_chance"]
    assert "89.00%" in verdict["warning"] and "--budget" in verdict["warning"]
    assert "barely above" in verdict["warning"]
    assert verdict["warning"] in format_table(_with_task(near), summary)
    # the same test labels, but the training set's majority is class 0 (11 % of the test set): no warning
    far = _LabelledTask([0, 0, 1], [1] * 89 + [0] * 11)
    verdict = summarize(_with_task(far))["verdict"]
    assert verdict["majority_rate"] == pytest.approx(0.11) and not verdict["near_chance"]
    assert verdict["warning"] is None and "warning" not in format_table(_with_task(far), summarize(_with_task(far)))
    # a small test set: 3 examples' worth is the margin (0.90 < 0.80 + 3/20)
    small = _LabelledTask([1, 1, 0], [1] * 16 + [0] * 4)
    assert summarize(_with_task(small))["verdict"]["near_chance"]
    # a target under the majority rate (ArrowHead, BENCHMARKS.md §6) is said to be "not above" it
    under = _LabelledTask([1, 1, 0], [1] * 95 + [0] * 5)
    assert "is not above always predicting" in summarize(_with_task(under))["verdict"]["warning"]


def test_no_majority_rate_without_integer_labels():
    assert summarize(_with_task(_FakeTask()))["verdict"]["majority_rate"] is None  # no labels at all
    floats = _LabelledTask([0.5, 1.5], [0.5, 1.5])
    assert summarize(_with_task(floats))["verdict"]["majority_rate"] is None

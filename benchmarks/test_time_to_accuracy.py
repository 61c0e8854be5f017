"""Time to accuracy: SNOpt against the baselines a user would pick, with the robust verdict of
``snopt-dyn compare`` (``snopt_dyn.compare.verdict``), on the ``timeseries`` (torchcde Neural CDE on UEA
JapaneseVowels) and ``image`` (torchdyn conv Neural ODE on the vendored MNIST subset) tasks.

It reuses the runner behind ``snopt-dyn compare`` (``compare_seeds``: each seed's optimizers interleaved
one iteration at a time, own model with the same initial weights, own optimizer, data order and clock,
evaluation off the clock) and its ``summarize``: per seed the target is the best baseline's plateau
(mean of its last third of evaluations), an optimizer reaches it when the running mean of 3
evaluations does, the ratio is SNOpt's time over the fastest baseline's, and the verdict is the median
over seeds (never "faster" with a lower plateau).

Full mode: 3 seeds, the budgets below (~25 minutes of wall clock on 2 cores); the image task is
evaluated on an evenly spaced half (500) of its 1,000 test images.  Quick mode: 1 seed, 3 iterations
per optimizer on tiny subsets; it checks that the outputs are well formed and prints no figures.
Target (measured, not asserted): median ratio <= 0.5 with SNOpt's plateau >= the best baseline's.
"""
from __future__ import annotations

import math
import warnings

import pytest

from snopt_dyn.compare import compare_seeds, get_task, summarize

from snopt_dyn_bench import FULL, finite_positive, pick

OPTIMIZERS = ["snopt", "adam", "sgd", "adamw-cosine", "soap"]
FULL_SETTINGS = {
    "timeseries": dict(budget=40.0, eval_points=15, max_test=None),
    "image": dict(budget=30.0, eval_points=14, max_test=500),
}
# max_test 16: each quick evaluation solves the test series at the task's 1e-5 with per-sample error
# control, and 48 of them made 20 evaluations cost 36 of this test's 44 s on a slow 2-core host
QUICK_SETTINGS = dict(iters=3, eval_points=3, max_train=64, max_test=16)
SEEDS = pick([0], [0, 1, 2])


def _run(task_name):
    settings = FULL_SETTINGS[task_name] if FULL else QUICK_SETTINGS
    task = get_task(task_name).prepare("cpu", max_train=settings.get("max_train"), max_test=settings["max_test"])
    kwargs = dict(budget=settings["budget"]) if FULL else dict(iters=settings["iters"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = compare_seeds(task, OPTIMIZERS, SEEDS, eval_points=settings["eval_points"], progress=False, **kwargs)
    return results, summarize(results)


def _lines(task_name, summary):
    show = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = []
    for o in summary["optimizers"]:
        p, t = o["plateau"], o["time_to_target_s"]
        lines.append(f"{task_name}: {o['optimizer']:12s} plateau {show(p[0])} [{show(p[1])}, {show(p[2])}], "
                     f"time to target {t[0]:.1f} s ({o['reached']}/{o['seeds']} reached), @1/4 {show(o['at_quarter'])}, "
                     f"@1/2 {show(o['at_half'])}, {o['iters_per_s']:.2f} it/s, NFE/it {o['nfe_per_iter']:.0f}")
    lines.append(f"{task_name}: {summary['verdict']['text']}")
    return lines


@pytest.mark.parametrize("task_name", ["timeseries", "image"])
def test_time_to_accuracy(benchmark, record, task_name):
    pytest.importorskip("torchcde" if task_name == "timeseries" else "torchdyn")
    pytest.importorskip("pytorch_optimizer")
    out = {}
    benchmark.pedantic(lambda: out.update(zip(("results", "summary"), _run(task_name))), rounds=1, iterations=1)
    results, summary = out["results"], out["summary"]
    verdict = summary["verdict"]
    record(f"time_to_accuracy[{task_name}]", dict(
        task=task_name, seeds=SEEDS, optimizers=OPTIMIZERS, settings=results[0].settings,
        ratio=verdict["ratio"], loss_ratio=verdict["loss_ratio"], faster=verdict["faster"], verdict=verdict["text"],
        per_optimizer=summary["optimizers"], per_seed=summary["per_seed"],
        target="median ratio <= 0.5 and SNOpt plateau >= best baseline plateau",
        target_met=bool(verdict["faster"] and verdict["ratio"][0] <= 0.5)), _lines(task_name, summary))

    # well formed, in every mode
    first_basis = (results[0].settings.get("snopt") or {}).get("first_basis", 0)
    assert summary["seeds"] == SEEDS and [o["optimizer"] for o in summary["optimizers"]] == OPTIMIZERS
    for seed in summary["per_seed"]:
        for r in seed["runs"]:
            # a run the solver or a NaN stopped is a result (compare records it), not a malformed output
            assert r["status"] == "ok" or (FULL and r["status"].startswith("stopped at iteration")), r
            assert r["iterations"] >= 1 and finite_positive(r["train_clock_s"]) and 0 <= r["plateau"] <= 1
            assert finite_positive(r["nfe_per_iter"]) and r["nfe_forward_per_iter"] > 0 and r["nfe_backward_per_iter"] > 0
            assert r["time_to_target_s"] is None or 0 <= r["time_to_target_s"] <= r["train_clock_s"]
            if r["kind"] == "snopt":  # the first basis (and sampling) comes at iteration first_basis
                if r["iterations"] > first_basis:
                    assert r["refreshes"] >= 1 and r["sampling_nfe_per_iter"] > 0
                else:
                    assert r["refreshes"] == 0
            if not FULL:
                assert r["iterations"] == QUICK_SETTINGS["iters"]
        assert seed["ratio"] is None or seed["ratio"] == math.inf or finite_positive(seed["ratio"])

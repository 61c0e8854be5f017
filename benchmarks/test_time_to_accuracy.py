"""Time to accuracy: training-clock seconds for SNOpt, Adam, SGD+momentum and plain SGD to reach a
target test accuracy, on the ``compare`` tasks (``snopt_dyn.compare.tasks``):

* ``timeseries``: the torchcde Neural CDE on UEA JapaneseVowels;
* ``image``: the torchdyn conv Neural ODE on the vendored MNIST subset.

It reuses ``snopt_dyn.compare.compare`` -- the runner behind ``snopt-dyn compare``: every optimizer
has its own model (same initial weights), optimizer, data order and clock, and they take turns one
iteration at a time in one process; only training iterations are on the clock (evaluation is off
it) -- and ``summarize``, whose target is the best *final* test accuracy of the first-order methods
of that run, and whose ratio is SNOpt's time to the target over the best first-order method's.
Every optimizer uses the task's tuned defaults (learning rates, SNOpt's damping / refresh interval /
sample step).  Seeds run one after the other (each seed's optimizers interleaved); the ratio is taken
per seed, and its median and range over the seeds are reported with the NFE per iteration.

Full mode: 3 seeds; budgets (training-clock seconds per optimizer) below, chosen so that this file
takes ~20-25 minutes of wall clock on 2 cores; the image task is evaluated on an evenly spaced half
(500) of its 1,000 test images to keep evaluation affordable.  Quick mode: 1 seed, 2 iterations per
optimizer, tiny evaluation sets; it checks that the outputs are well formed.

Target (measured, not asserted): SNOpt reaches the target in <= 0.5x the time of the best first-order
method on both tasks (median over seeds).  A seed where SNOpt never reaches the target counts as
``inf`` in the median.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings

import pytest

from snopt_dyn.compare import compare, summarize
from snopt_dyn.compare import get_task

from snopt_dyn_bench import FULL, finite_positive, pick

OPTIMIZERS = ["snopt", "adam", "sgd", "sgd-plain"]
FULL_SETTINGS = {
    "timeseries": dict(budget=45.0, eval_points=15, max_test=None),
    "image": dict(budget=35.0, eval_points=14, max_test=500),
}
QUICK_SETTINGS = dict(iters=2, eval_points=1, max_train=64, max_test=48)
SEEDS = pick([0], [0, 1, 2])


def _run(task_name, seed):
    settings = FULL_SETTINGS[task_name] if FULL else QUICK_SETTINGS
    task = get_task(task_name).prepare("cpu", max_train=settings.get("max_train"), max_test=settings["max_test"])
    kwargs = dict(budget=settings["budget"]) if FULL else dict(iters=settings["iters"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compare(task, OPTIMIZERS, seed=seed, eval_points=settings["eval_points"], progress=False, **kwargs)
    return task, result, summarize(result)


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(summary) -> float:
    """SNOpt / best first-order time to target; inf when SNOpt did not reach it (nan: nobody did)."""
    if summary["snopt_time_ratio"] is not None:
        return float(summary["snopt_time_ratio"])
    snopt = next(r for r in summary["optimizers"] if r["kind"] == "snopt")
    return math.inf if snopt["time_to_target_s"] is None and summary["best_first_order"] else math.nan


@pytest.mark.parametrize("task_name", ["timeseries", "image"])
def test_time_to_accuracy(benchmark, record, task_name):
    pytest.importorskip("torchcde" if task_name == "timeseries" else "torchdyn")
    per_seed = []

    def run_all():
        for seed in SEEDS:
            tic = time.perf_counter()
            task, result, summary = _run(task_name, seed)
            per_seed.append(dict(seed=seed, wall_s=time.perf_counter() - tic, summary=summary,
                                 settings=result.settings, ratio=_ratio(summary),
                                 curves={r.name: [(e["train_clock_s"], e["test_metric"]) for e in r.evals]
                                         for r in result.runs}))

    benchmark.pedantic(run_all, rounds=1, iterations=1)

    ratios = [s["ratio"] for s in per_seed]
    finite = [r for r in ratios if not math.isnan(r)]
    med = statistics.median(finite) if finite else math.nan
    table = {}
    for name in OPTIMIZERS:
        rows = [next(r for r in s["summary"]["optimizers"] if r["optimizer"] == name) for s in per_seed]
        ttt = [r["time_to_target_s"] if r["time_to_target_s"] is not None else math.inf for r in rows]
        table[name] = dict(
            final_acc_median=statistics.median(r["final_metric"] for r in rows),
            best_acc_median=statistics.median(r["best_metric"] for r in rows),
            late_mean_acc_median=_median_or_none([r.get("late_mean_metric") for r in rows]),
            time_to_target_median_s=statistics.median(ttt), reached=sum(math.isfinite(t) for t in ttt),
            iters_per_s_median=statistics.median(r["iters_per_s"] for r in rows),
            nfe_per_iter_median=statistics.median(r["nfe_per_iter"] for r in rows),
            nfe_fwd_bwd_per_iter_median=(statistics.median(r["nfe_forward_per_iter"] for r in rows),
                                         statistics.median(r["nfe_backward_per_iter"] for r in rows)),
            iterations_median=statistics.median(r["iterations"] for r in rows))
    targets = [s["summary"]["target"] for s in per_seed]
    best_fo = [s["summary"]["best_first_order"] for s in per_seed]
    budget = per_seed[0]["settings"]["budget_s"]
    lines = [f"{task_name}: {len(SEEDS)} seed(s), " + (f"budget {budget:g} s/optimizer" if budget else
             f"{per_seed[0]['settings']['iters']} iterations/optimizer") +
             f", targets {', '.join(f'{100 * t:.1f}%' for t in targets)} (best first-order: {', '.join(map(str, best_fo))})"]
    for name, row in table.items():
        late = row["late_mean_acc_median"]
        lines.append(f"{task_name}: {name:9s} final {100 * row['final_acc_median']:.1f}%, best {100 * row['best_acc_median']:.1f}%, "
                     + (f"last-third mean {100 * late:.1f}%, " if late is not None else "") +
                     f"time to target {row['time_to_target_median_s']:.1f} s ({row['reached']}/{len(SEEDS)} reached), "
                     f"{row['iters_per_s_median']:.2f} it/s, NFE/it {row['nfe_per_iter_median']:.0f}")
    lines.append(f"{task_name}: SNOpt / best first-order time to target: median {med:.2f} "
                 f"(per seed: {', '.join(f'{r:.2f}' for r in ratios)}; target <= 0.5: "
                 f"{'met' if med <= 0.5 else 'MISSED'})")
    record(f"time_to_accuracy[{task_name}]", dict(
        task=task_name, seeds=SEEDS, optimizers=OPTIMIZERS, settings=per_seed[0]["settings"],
        ratio_median=med, ratio_min=min(finite) if finite else None, ratio_max=max(finite) if finite else None,
        ratio_per_seed=ratios, per_optimizer=table, per_seed=per_seed,
        target="SNOpt time to target <= 0.5x best first-order (median over seeds)", target_met=med <= 0.5), lines)

    # well formed, in every mode
    for s in per_seed:
        summary = s["summary"]
        assert 0 < summary["target"] <= 1
        assert {r["optimizer"] for r in summary["optimizers"]} == set(OPTIMIZERS)
        for r in summary["optimizers"]:
            # a run the solver or a NaN stopped is a result (compare records it), not a malformed output
            assert r["status"] == "ok" or (FULL and r["status"].startswith("stopped at iteration")), r
            assert r["iterations"] >= 1 and finite_positive(r["train_clock_s"])
            assert 0 <= r["final_metric"] <= 1 and r["final_metric"] <= r["best_metric"] <= 1
            assert finite_positive(r["nfe_per_iter"]) and r["nfe_forward_per_iter"] > 0 and r["nfe_backward_per_iter"] > 0
            assert r["time_to_target_s"] is None or 0 <= r["time_to_target_s"] <= r["train_clock_s"]
            if r["kind"] == "snopt":
                assert r["refreshes"] >= 1 and r["sampling_nfe_total"] > 0
        if not FULL:
            assert all(r["iterations"] == QUICK_SETTINGS["iters"] for r in summary["optimizers"])
        assert math.isnan(s["ratio"]) or s["ratio"] == math.inf or finite_positive(s["ratio"])
        assert all(len(c) >= 2 for c in s["curves"].values())

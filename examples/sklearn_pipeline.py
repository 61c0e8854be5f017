"""Neural CDEs in scikit-learn pipelines: grid search, then SNOpt vs Adam at equal time in cross-validation.

Data: the vendored UEA JapaneseVowels (270 train / 370 test series, 12 channels, lengths 7-29, 9 speakers)
and BasicMotions (40 / 40, 6 channels, length 100, 4 activities), passed as lists of variable-length
``(length, channels)`` arrays with their original labels; every preprocessing step (standardisation,
time channel, spline) is fitted inside the estimator, on each training fold only.

1. ``Pipeline([features, NeuralCDEClassifier])`` with a small ``GridSearchCV`` (2 folds, every fit
   capped by ``max_time``), refitted on the whole training split and scored on the test split.  The
   ``features`` step subsamples BasicMotions to every 4th step (length 25: a training step on the full
   length 100 takes ~5 s here) and may append first differences.
2. ``cross_validate`` of ``optimizer="snopt"`` and ``optimizer="adam"`` (each with its tuned default
   learning rate) at the same ``max_time`` per fit: mean accuracy on the held-out folds and fit times.

The runs are sequential on one machine, whose speed may drift between them (see BENCHMARKS.md for the
interleaved comparison); read the second table as a usage example, not as a benchmark.
Runs in about 5 minutes on 2 CPU cores::

    python examples/sklearn_pipeline.py            # both data sets
    python examples/sklearn_pipeline.py --quick    # a smoke run (seconds per fit instead of tens)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from snopt_dyn import datasets
from snopt_dyn.estimators import NeuralCDEClassifier


def series_features(X, stride: int = 1, differences: bool = False):
    """A pipeline step on series: keep every ``stride``-th step (a CDE's cost grows with the length),
    optionally append first differences as extra channels."""
    X = [x[::stride] for x in X]
    if differences:
        X = [np.concatenate([x, np.diff(x, axis=0, prepend=x[:1])], axis=1) for x in X]
    return X


def pipeline(max_time: float, stride: int = 1, **cde) -> Pipeline:
    cde.setdefault("validation_fraction", 0.2)  # stratified validation splits even on 20-series folds
    return Pipeline([("features", FunctionTransformer(series_features, kw_args={"stride": stride})),
                     ("cde", NeuralCDEClassifier(max_time=max_time, max_epochs=10_000, verbose=0, random_state=0,
                                                 **cde))])


def grid_search(name, train, test, grid, max_time):
    start = time.perf_counter()
    search = GridSearchCV(pipeline(max_time), grid, cv=StratifiedKFold(2, shuffle=True, random_state=0),
                          error_score="raise").fit(*train)
    print(f"\n{name}: grid search (2 folds, max_time={max_time:g} s per fit) took {time.perf_counter() - start:.0f} s")
    for params, mean, std in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                                 search.cv_results_["std_test_score"]):
        print(f"  {params}: CV accuracy {mean:.3f} +- {std:.3f}")
    best = search.best_estimator_.named_steps["cde"]
    print(f"  best {search.best_params_}: test accuracy {search.score(*test):.3f} "
          f"(refit: {best.n_iter_} epochs, {best.n_steps_} steps, {best.fit_time_:.1f} s, stopped by {best.stopped_by_})")


def compare(name, train, max_time, folds, stride=1):
    print(f"\n{name}: SNOpt vs Adam, {folds}-fold CV, max_time={max_time:g} s per fit, no early stopping")
    print(f"  {'optimizer':9s} {'accuracy':>15s} {'fit time (s)':>13s} {'steps':>7s}")
    for optimizer in ("snopt", "adam"):
        est = pipeline(max_time, stride, optimizer=optimizer, early_stopping=False)
        cv = StratifiedKFold(folds, shuffle=True, random_state=0)
        out = cross_validate(est, *train, cv=cv, return_estimator=True, error_score="raise")
        steps = np.mean([e.named_steps["cde"].n_steps_ for e in out["estimator"]])
        print(f"  {optimizer:9s} {out['test_score'].mean():8.3f} +- {out['test_score'].std():.3f} "
              f"{out['fit_time'].mean():13.1f} {steps:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 0.15 if args.quick else 1.0
    start = time.perf_counter()
    vowels = datasets.load_japanese_vowels("train").as_lists(), datasets.load_japanese_vowels("test").as_lists()
    motions = datasets.load_basic_motions("train").as_lists(), datasets.load_basic_motions("test").as_lists()
    grid_search("JapaneseVowels", *vowels, {"cde__hidden": [16, 32]}, max_time=12 * scale)
    grid_search("BasicMotions", *motions,
                {"features__kw_args": [{"stride": 4}, {"stride": 4, "differences": True}]}, max_time=10 * scale)
    compare("JapaneseVowels", vowels[0], max_time=12 * scale, folds=3)
    compare("BasicMotions", motions[0], max_time=10 * scale, folds=3, stride=4)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

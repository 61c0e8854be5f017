"""The scikit-learn estimators' SNOpt settings against each other and Adam, at equal fit time.

``NeuralCDEClassifier`` fits with each configuration below, interleaved per seed (seed 0: every
configuration, then seed 1, ...), each fit capped by the same ``max_time`` and otherwise at the
estimator's defaults (early stopping on a 10 % validation split, best-validation weights kept).
Prints the test accuracy per configuration and data set as median [min, max] over the seeds, and
writes every fit's figures to ``--out`` (JSON).

    python benchmarks/estimator_defaults.py --seeds 3 --max-time 30 \
        --data japanese_vowels,basic_motions,/tmp/ucr/ItalyPowerDemand_TRAIN.ts:/tmp/ucr/ItalyPowerDemand_TEST.ts

``--data``: vendored names (``japanese_vowels``, ``basic_motions``) or ``TRAIN.ts:TEST.ts`` pairs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from snopt_dyn import datasets
from snopt_dyn.estimators import NeuralCDEClassifier

#: name -> estimator keyword arguments (``optimizer``, ``lr``, ``snopt_options``)
CONFIGS = {
    "paper": dict(optimizer="snopt", lr=0.02, snopt_options={"rule": "ekfac", "update_freq": 50}),
    "adam-rule": dict(optimizer="snopt", lr=1e-2, snopt_options={"rule": "adam", "power": 0.5, "update_freq": 20}),
    "adam-rule-cosine": dict(optimizer="snopt", lr=1e-2, schedule="cosine",
                             snopt_options={"rule": "adam", "power": 0.5, "update_freq": 20}),
    "adam": dict(optimizer="adam", lr=3e-3),
    "adam-cosine": dict(optimizer="adam", lr=3e-3, schedule="cosine"),
}


def load(spec: str):
    """``(name, train, test)`` of a vendored name or a ``TRAIN.ts:TEST.ts`` pair."""
    if ":" in spec:
        train_path, test_path = spec.split(":")
        train = datasets.load_uea_ts(train_path)
        test = datasets.load_uea_ts(test_path, classes=train.classes)
        return Path(train_path).stem.replace("_TRAIN", ""), train.as_lists(), test.as_lists()
    loader = getattr(datasets, f"load_{spec}")
    return spec, loader("train").as_lists(), loader("test").as_lists()


def fit_once(config: dict, seed: int, max_time: float, train, test) -> dict:
    model = NeuralCDEClassifier(max_time=max_time, max_epochs=10_000, random_state=seed, verbose=0, **config)
    start = time.perf_counter()
    model.fit(*train)
    fit_time = time.perf_counter() - start
    return {"accuracy": float(model.score(*test)), "fit_time": fit_time, "steps": int(model.n_steps_),
            "epochs": int(model.n_iter_), "stopped_by": model.stopped_by_,
            "final_train_loss": float(model.loss_curve_[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="japanese_vowels,basic_motions")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-time", type=float, default=30.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="estimator_defaults.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.configs.split(",")
    results = []
    for spec in args.data.split(","):
        data_name, train, test = load(spec)
        for seed in range(args.seeds):
            for name in names:
                row = {"data": data_name, "config": name, "seed": seed,
                       **fit_once(CONFIGS[name], seed, args.max_time, train, test)}
                results.append(row)
                print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\n{data_name}: test accuracy, median [min, max] over {args.seeds} seeds (steps, stopped by)")
        for name in names:
            rows = [r for r in results if r["data"] == data_name and r["config"] == name]
            acc = 100 * np.array([r["accuracy"] for r in rows])
            steps = int(np.median([r["steps"] for r in rows]))
            stops = ",".join(sorted({r["stopped_by"] for r in rows}))
            print(f"  {name:>18}: {np.median(acc):6.2f} % [{acc.min():.2f}, {acc.max():.2f}]  ({steps} steps, {stops})")
        print(flush=True)


if __name__ == "__main__":
    main()

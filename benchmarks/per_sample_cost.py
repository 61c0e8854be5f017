"""What per-sample error control costs in training: steps and time per iteration, interleaved.

Two copies of the main job's timeseries Neural CDE (same initial weights, same batches, Adam),
one wrapped with ``per_sample_error=True`` and one with ``False`` (torchdiffeq's joint norm), take
turns one iteration at a time; and a batch-dependence probe of each at evaluation.

    python benchmarks/per_sample_cost.py [--iters 60] [--seeds 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import snopt_dyn
from snopt_dyn.compare.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--task", default="timeseries")
    args = parser.parse_args()
    task = get_task(args.task, "").prepare("cpu")
    rows = {True: [], False: []}
    for seed in range(args.seeds):
        models = {}
        for mode in (True, False):
            torch.manual_seed(seed)
            models[mode] = snopt_dyn.wrap(task.builder(task.info), per_sample_error=mode)
        opts = {m: torch.optim.Adam(models[m].parameters(), lr=task.lrs["adam"]) for m in models}
        gen = torch.Generator().manual_seed(seed)
        for it in range(args.iters):
            index = torch.randperm(task.n_train, generator=gen)[:task.batch_size]
            for mode in ((True, False) if it % 2 else (False, True)):
                snopt_dyn.nfe.reset()
                start = time.perf_counter()
                opts[mode].zero_grad()
                loss = task.loss(models[mode], index)
                loss.backward()
                opts[mode].step()
                rows[mode].append((time.perf_counter() - start, snopt_dyn.nfe.forward, snopt_dyn.nfe.backward))
    for mode in (False, True):
        t = [r[0] for r in rows[mode]]
        f = [r[1] for r in rows[mode]]
        b = [r[2] for r in rows[mode]]
        print(f"per_sample_error={mode!s:5}  s/it median {statistics.median(t):.3f} "
              f"[q1 {statistics.quantiles(t)[0]:.3f}, q3 {statistics.quantiles(t)[2]:.3f}]  "
              f"NFE fwd {statistics.mean(f):.0f}  bwd {statistics.mean(b):.0f}")
    ratio = [a[0] / b[0] for a, b in zip(rows[True], rows[False])]
    print(f"time ratio per-sample / joint, per iteration: median {statistics.median(ratio):.2f} "
          f"[q1 {statistics.quantiles(ratio)[0]:.2f}, q3 {statistics.quantiles(ratio)[2]:.2f}]")


if __name__ == "__main__":
    main()

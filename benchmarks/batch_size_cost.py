"""Time per iteration against batch size, for every optimizer of a task, on this machine.

For each batch size the optimizers run interleaved one iteration at a time (``compare`` with a
fixed number of iterations, evaluations off the clock), so the figures of one row are side by side.
Prints seconds per iteration and per training example.  Where the cost per example falls with the
batch, a larger batch may reach a given accuracy sooner; that is checked with ``snopt-dyn compare
--batch-size``.

    python benchmarks/batch_size_cost.py [--task timeseries] [--iters 12] [--sizes 16,32,64,128]
"""
from __future__ import annotations

import argparse

from snopt_dyn.compare import compare, get_task

OPTIMIZERS = ["snopt", "snopt[rule=adam;power=0.5]@3e-3", "adamw-cosine", "soap", "adam"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="timeseries")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--sizes", default="16,32,64,128")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    task = get_task(args.task).prepare("cpu", max_test=50)
    names = args.optimizers.split(",")
    print(f"{'batch':>5}  " + "  ".join(f"{n[:28]:>28}" for n in names) + "   (s/it | ms/example)")
    for size in (int(s) for s in args.sizes.split(",")):
        result = compare(task, names, iters=args.iters, batch_size=size, eval_points=1, progress=False)
        cells = [f"{r.clock / r.iters:7.3f} | {1e3 * r.clock / (r.iters * size):6.1f}" for r in result.runs]
        print(f"{size:>5}  " + "  ".join(f"{c:>28}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

"""Markdown ablation table of SNOpt variants from a ``snopt-dyn compare`` ``results.json``.

Every variant is judged as the verdict judges SNOpt (``snopt_dyn/compare/verdict.py``): per seed,
the target is the best baseline's plateau, the time is when the variant's running mean of 3
evaluations first reaches it, the ratio is over the fastest baseline's time; then the median.

    python benchmarks/ablation_table.py snopt-dyn-results/timeseries-.../results.json
"""
from __future__ import annotations

import json
import math
import statistics
import sys

from snopt_dyn.compare.optimizers import BASELINES


def _fmt(value, pct):
    if value is None or math.isinf(value):
        return "never"
    return f"{100 * value:.2f} %" if pct else f"{value:.2f}"


def table(results: dict) -> str:
    summary = results["summary"]
    pct = summary["metric"] == "accuracy"
    names = [o["optimizer"] for o in summary["optimizers"]]
    lines = ["| run | plateau median [min, max] | ratio per seed (vs fastest baseline) | median ratio | "
             "train-loss plateau (median) |", "|---|---|---|---|---|"]
    for name in names:
        rows = [r for s in summary["per_seed"] for r in s["runs"] if r["optimizer"] == name]
        ratios = []
        for s in summary["per_seed"]:
            fastest = s["fastest_baseline"]
            mine = next(r for r in s["runs"] if r["optimizer"] == name)
            ref = next((r["time_to_target_s"] for r in s["runs"] if r["optimizer"] == fastest), None)
            if ref is None:
                ratios.append(None)
            else:
                t = mine["time_to_target_s"]
                ratios.append(math.inf if t is None else t / ref)
        plateaus = [r["plateau"] for r in rows if r["plateau"] is not None]
        losses = [r["loss_plateau"] for r in rows if r["loss_plateau"] is not None]
        have = [r for r in ratios if r is not None]
        kind = rows[0]["kind"]
        per_seed = ", ".join("-" if r is None else ("never" if math.isinf(r) else f"{r:.2f}") for r in ratios)
        med = "—" if kind in BASELINES else _fmt(statistics.median(have) if have else None, False)
        plat = (f"{_fmt(statistics.median(plateaus), pct)} [{_fmt(min(plateaus), pct)}, {_fmt(max(plateaus), pct)}]"
                if plateaus else "-")
        loss = f"{statistics.median(losses):.4f}" if losses else "-"
        lines.append(f"| {name} | {plat} | {per_seed if kind not in BASELINES else '—'} | {med} | {loss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as fh:
            print(table(json.load(fh)))

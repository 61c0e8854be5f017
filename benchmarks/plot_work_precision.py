"""Draw ``docs/work_precision.png`` and print the markdown table from a work-precision run.

Usage (after ``SNOPT_DYN_BENCH=full python -m pytest benchmarks/test_work_precision.py``)::

    python benchmarks/plot_work_precision.py [.benchmarks/snopt-dyn-full.json] [docs/work_precision.png]

One panel per library: gradient error against one training step's time, log-log, one curve per side
(the points are the tolerances 1e-3 ... 1e-7).  A curve to the left of another is faster at the same
accuracy.  The table gives, at each accuracy level, each side's least step time reaching it.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = [10.0 ** -k for k in range(1, 9)]
STYLE = {"native": ("tab:blue", "o", "-"), "native+seminorm": ("tab:blue", "s", "--"),
         "ours": ("tab:red", "o", "-"), "ours+seminorm": ("tab:red", "s", "--")}


def load_points(path: str) -> Dict[str, Dict[str, Dict[float, dict]]]:
    """library -> side -> tol -> {error, ms, nfe} from the benchmark's JSON results."""
    with open(path) as fh:
        results = json.load(fh)["results"]
    points: Dict[str, Dict[str, Dict[float, dict]]] = {}
    for key, value in results.items():
        if key.startswith("work_precision[") and "tols" in value:  # one entry per library
            points[value["library"]] = {side: {float(tol): p for tol, p in by_tol.items()}
                                        for side, by_tol in value["points"].items()}
    return points


def table(points: Dict[str, Dict[str, Dict[float, dict]]]) -> List[str]:
    """Markdown: per library, at each accuracy level, each side's least step time (ms) reaching it."""
    lines = []
    for library, by_side in points.items():
        sides = list(by_side)
        lines += [f"**{library}** (least step time in ms reaching the gradient error; — = never reached)", "",
                  "| gradient error | " + " | ".join(sides) + " | fastest | ours / native (same norm) |",
                  "|---" * (len(sides) + 3) + "|"]
        worst = max(p["error"] for tols in by_side.values() for p in tols.values())
        for level in LEVELS:
            best = {s: min([p["ms"] for p in by_side[s].values() if p["error"] <= level], default=None)
                    for s in sides}
            reached = {s: v for s, v in best.items() if v is not None}
            if not reached or level > 10 * worst:
                continue
            ratios = [f"{best[o] / best[n]:.2f}" for n, o in (("native", "ours"), ("native+seminorm", "ours+seminorm"))
                      if best.get(n) and best.get(o)]
            lines.append(f"| <= {level:.0e} | " + " | ".join(f"{best[s]:.0f}" if best[s] else "—" for s in sides) +
                         f" | {min(reached, key=reached.get)} | {' / '.join(ratios) or '—'} |")
        lines.append("")
    return lines


def plot(points: Dict[str, Dict[str, Dict[float, dict]]], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4.2), squeeze=False)
    for ax, (library, by_side) in zip(axes[0], points.items()):
        for side, tols in by_side.items():
            order = sorted(tols, reverse=True)
            color, marker, line = STYLE.get(side, ("gray", "x", ":"))
            ax.loglog([tols[t]["ms"] for t in order], [tols[t]["error"] for t in order], line, marker=marker,
                      color=color, label=side)
            for t in order[:1] + order[-1:]:
                ax.annotate(f"{t:.0e}", (tols[t]["ms"], tols[t]["error"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(library)
        ax.set_xlabel("one training step (ms)")
        ax.set_ylabel("gradient error vs float64 backprop")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Work-precision: dopri5, rtol = atol = 1e-3 ... 1e-7 (left is faster at equal accuracy)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: List[str]) -> None:
    source = argv[1] if len(argv) > 1 else os.path.join(ROOT, ".benchmarks", "snopt-dyn-full.json")
    out = argv[2] if len(argv) > 2 else os.path.join(ROOT, "docs", "work_precision.png")
    points = load_points(source)
    if not points:
        raise SystemExit(f"no work-precision results in {source}; run SNOPT_DYN_BENCH=full python -m pytest "
                         "benchmarks/test_work_precision.py first")
    plot(points, out)
    print("\n".join(table(points)))
    print(f"plot: {out}")


if __name__ == "__main__":
    main(sys.argv)

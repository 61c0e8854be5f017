"""The comparison's figure: test metric against training wall-clock, one line per optimizer (median over seeds)."""
from __future__ import annotations

import textwrap
from typing import List, Sequence

from .optimizers import Combined
from .summary import Results, _as_list, fmt_metric, machine_info

from .results import Run

COLORS = {"snopt": "#d62728", "adam": "#1f77b4", "sgd": "#2ca02c", "sgd-plain": "#9467bd",
          "adamw-cosine": "#ff7f0e", "muon": "#8c564b", "soap": "#17becf"}
LABELS = {"snopt": "SNOpt (SGD)", "adam": "Adam", "sgd": "SGD momentum", "sgd-plain": "SGD",
          "adamw-cosine": "AdamW cosine", "muon": "Muon + AdamW", "soap": "SOAP"}


def _color(run: Run, runs: List[Run]):
    """The optimizer's colour; several runs of one optimizer (a sweep) get shades of it."""
    base = COLORS.get(run.kind, "#7f7f7f")
    same = [r for r in runs if r.kind == run.kind]
    if len(same) == 1:
        return base
    import matplotlib.colors as mcolors
    k = same.index(run) / (len(same) - 1)  # 0: the full colour ... 1: pale
    return tuple(c * (1 - 0.6 * k) + 0.6 * k for c in mcolors.to_rgb(base))


def import_pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'snopt-dyn[examples]'), or pass --no-plot") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def band(runs: Sequence["Run"], scale: float, points: int = 60):
    """``(grid, median, low, high)`` of the runs' test curves (one run per seed) on a common time grid
    up to the shortest run's clock (linear interpolation between evaluations)."""
    import numpy as np
    curves = [(np.array([e["train_clock_s"] for e in r.evals]), scale * np.array([e["test_metric"] for e in r.evals]))
              for r in runs if len(r.evals) >= 2]
    if not curves:
        return None
    end = min(x[-1] for x, _ in curves)
    grid = np.linspace(0.0, end, points)
    values = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, np.median(values, axis=0), values.min(axis=0), values.max(axis=0)


def _label(run) -> str:
    """The legend's name of a run; SNOpt's says what its base optimizer does (schedule, other layers)."""
    if run.kind != "snopt":
        return LABELS.get(run.kind, run.kind)
    rule = getattr(run.precond, "rule", "ekfac")
    base = ["Adam rule" if rule == "adam" else "SGD"] + (["cosine"] if run.lr_schedule is not None else [])
    if isinstance(run.optimizer, Combined):  # SGD for the preconditioned layers, Adam for the rest
        base.append("Adam for other layers")
    return f"SNOpt ({', '.join(base)})"


def plot_curves(results: Results, summary: dict, fh) -> None:
    """Test metric vs training wall-clock: each optimizer's median over seeds, with a [min, max] band."""
    plt = import_pyplot()
    results = _as_list(results)
    task = results[0].task
    scale = 100.0 if task.metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    try:
        first = results[0].runs
        for i, run in enumerate(first):
            same = [r.runs[i] for r in results]
            curve = band(same, scale)
            if curve is None:
                continue
            grid, med, low, high = curve
            color = _color(run, first)
            label = run.name if "[" in run.name else _label(run)
            ax.plot(grid, med, lw=1.8, color=color, label=f"{label}, lr {run.lr:g}")
            if len(results) > 1:
                ax.fill_between(grid, low, high, color=color, alpha=0.15, lw=0)
        _decorate(ax, results, summary, scale)
        fig.tight_layout()
        fig.savefig(fh, format="png")
    finally:
        plt.close(fig)


def _decorate(ax, results, summary: dict, scale: float) -> None:
    task = results[0].task
    targets = [s["target"] for s in summary["per_seed"] if s["target"] is not None]
    if targets:
        target = sorted(targets)[len(targets) // 2]
        ax.axhline(scale * target, color="0.4", ls="--", lw=1, label=f"target {fmt_metric(target, task)} "
                   "(best baseline plateau" + (", median over seeds)" if len(targets) > 1 else ")"))
    later = [scale * e["test_metric"] for r in results for run in r.runs for e in run.evals
             if e["train_clock_s"] >= 0.2 * run.clock]
    if later and task.metric == "accuracy":  # frame: everything after the initial ramp stays visible
        ax.set_ylim(max(0.0, min(later) - 3), min(100.5, max(later) + 2))
    ax.set_xlabel("training wall-clock per optimizer [s] (evaluation excluded)")
    ax.set_ylabel("test accuracy [%]" if task.metric == "accuracy" else
                  "test NLL [nats], lower is better" if task.metric == "nll" else f"test {task.metric}")
    info = machine_info(task.device)
    threads = results[0].settings.get("threads", info["torch_threads"])
    where = info.get("gpu") or f"{info['cores']} CPU cores, {threads} torch thread(s)"
    seeds = len(results)
    subtitle = textwrap.fill(f"{task.description}; {where}; " + (f"median of {seeds} seeds, band = [min, max]"
                             if seeds > 1 else "one seed"), width=95)
    ax.set_title(f"snopt-dyn compare --task {task.name}\n{subtitle}", fontsize=8.5, loc="left")
    ax.grid(alpha=0.3)
    # outside the axes: a legend inside covered the ends of the curves
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

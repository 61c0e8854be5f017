"""The comparison's figure: test metric against training wall-clock, one line per optimizer."""
from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, List

from .summary import fmt_metric, machine_info

if TYPE_CHECKING:
    from .runner import CompareResult, Run

COLORS = {"snopt": "#d62728", "adam": "#1f77b4", "sgd": "#2ca02c", "sgd-plain": "#9467bd"}


LABELS = {"snopt": "SNOpt (SGD)", "adam": "Adam", "sgd": "SGD momentum", "sgd-plain": "SGD"}


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


def plot_curves(result: CompareResult, summary: dict, fh) -> None:
    """Test metric vs training wall-clock, one line per optimizer; the target as a dashed line."""
    plt = import_pyplot()
    task = result.task
    scale = 100.0 if task.metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    try:
        for run in result.runs:
            evals = run.evals
            xs = [e["train_clock_s"] for e in evals]
            ys = [scale * e["test_metric"] for e in evals]
            r = next(s for s in summary["optimizers"] if s["optimizer"] == run.name)
            label = f"{LABELS.get(run.kind, run.kind)}, lr {run.lr:g}"
            ax.plot(xs, ys, marker="o", markersize=3, lw=1.8, color=_color(run, result.runs), label=label)
            if r["time_to_target_s"] is not None:
                hit = next(e for e in evals if e["train_clock_s"] == r["time_to_target_s"])
                ax.plot([hit["train_clock_s"]], [scale * hit["test_metric"]], marker="*", markersize=14,
                        color=_color(run, result.runs), markeredgecolor="black", zorder=5)
        target = summary["target"]
        if target is not None:
            ax.axhline(scale * target, color="0.4", ls="--", lw=1,
                       label=f"target {fmt_metric(target, task)} (★ = first reached)")
        # frame: everything after the initial ramp (the first 20% of each run's clock) stays visible
        later = [scale * e["test_metric"] for run in result.runs for e in run.evals
                 if e["train_clock_s"] >= 0.2 * run.clock]
        if later and task.metric == "accuracy":
            low = min(later) if target is None else min(min(later), scale * target)
            ax.set_ylim(max(0.0, low - 3), min(100.5, max(later) + 2))
        ax.set_xlabel("training wall-clock per optimizer [s] (evaluation excluded)")
        ax.set_ylabel("test accuracy [%]" if task.metric == "accuracy" else "test NLL [nats], lower is better" if task.metric == "nll" else f"test {task.metric}")
        info = machine_info(task.device)
        threads = result.settings.get("threads", info["torch_threads"])
        where = info.get("gpu") or f"{info['cores']} CPU cores, {threads} torch thread(s)"
        ratio = summary["snopt_time_ratio"]
        verdict = f" — SNOpt time-to-target {ratio:.2f}× best first-order" if ratio is not None else ""
        subtitle = textwrap.fill(f"{task.description}; {where}", width=95)
        ax.set_title(f"snopt-dyn compare --task {task.name}{verdict}\n{subtitle}", fontsize=8.5, loc="left")
        ax.grid(alpha=0.3)
        # outside the axes: a legend inside covered the ends of the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(fh, format="png")
    finally:
        plt.close(fig)

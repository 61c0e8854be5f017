"""The numbers of a comparison: per-optimizer rows, the target, the verdict, and the printed table."""
from __future__ import annotations

import io
import math
import os
import platform
from typing import TYPE_CHECKING, Optional

import torch

import snopt_dyn
from .optimizers import FIRST_ORDER

if TYPE_CHECKING:  # annotations only: the runner builds on this module
    from .runner import CompareResult
    from .tasks.base import Task

# --------------------------------------------------------------------------------------- summary
def fmt_metric(value: Optional[float], task: Task) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if task.metric == "accuracy" else f"{value:.4f}"


def _reached(value: float, target: float, higher: bool) -> bool:
    # a small tolerance: accuracies are fractions of a finite test set (k / n), so compare counts
    return value >= target - 1e-9 if higher else value <= target + 1e-9


def choose_target(result: CompareResult, target: Optional[float] = None):
    """The target metric and where it came from: ``target`` if given, else the best *final*
    metric of the first-order methods in the comparison (``None`` when there are none)."""
    if target is not None:
        return float(target), "given with --target"
    higher = result.task.higher_is_better
    finals = [r.evals[-1]["test_metric"] for r in result.runs if r.kind in FIRST_ORDER and r.evals]
    if not finals:
        return None, "no first-order method in the comparison and no --target"
    best = max(finals) if higher else min(finals)
    return best, "best final test metric of the first-order methods"


def summarize(result: CompareResult, target: Optional[float] = None) -> dict:
    """The table's numbers: per optimizer, and the SNOpt / best-first-order time-to-target ratio."""
    higher = result.task.higher_is_better
    target, target_source = choose_target(result, target)
    rows = []
    for run in result.runs:
        evals = run.evals
        metrics = [e["test_metric"] for e in evals]
        hit = None
        if target is not None:
            hit = next((e for e in evals if _reached(e["test_metric"], target, higher)), None)
        iters = max(run.iters, 1)
        # single evaluations are noisy: also report the mean over the last third of the run's clock
        late = [e["test_metric"] for e in evals[1:] if e["train_clock_s"] >= 2 * run.clock / 3]
        rows.append(dict(
            optimizer=run.name, kind=run.kind, lr=run.lr, iterations=run.iters, train_clock_s=run.clock,
            final_metric=metrics[-1] if metrics else None,
            best_metric=(max(metrics) if higher else min(metrics)) if metrics else None,
            late_mean_metric=sum(late) / len(late) if late else None,
            time_to_target_s=hit["train_clock_s"] if hit else None,
            iterations_to_target=hit["iteration"] if hit else None,
            iters_per_s=run.iters / run.clock if run.clock > 0 else None,
            nfe_per_iter=(run.nfe_forward + run.nfe_backward) / iters,
            nfe_forward_per_iter=run.nfe_forward / iters,
            nfe_backward_per_iter=run.nfe_backward / iters,
            sampling_nfe_per_iter=run.sampling_nfe / iters if run.precond is not None else None,
            sampling_nfe_total=run.sampling_nfe if run.precond is not None else None,
            refreshes=run.precond.refreshes if run.precond is not None else None,
            precond_time_s=run.precond.total_step_time if run.precond is not None else None,
            status=run.status))
    ratio, best_fo = None, None
    reached = [r for r in rows if r["kind"] == "snopt" and r["time_to_target_s"] is not None]
    snopt = min(reached, key=lambda r: r["time_to_target_s"]) if reached else \
        next((r for r in rows if r["kind"] == "snopt"), None)
    fo = [r for r in rows if r["kind"] in FIRST_ORDER and r["time_to_target_s"] is not None]
    if fo:
        best_fo = min(fo, key=lambda r: r["time_to_target_s"])
    if snopt is not None and best_fo is not None and snopt["time_to_target_s"] is not None \
            and best_fo["time_to_target_s"] > 0:
        ratio = snopt["time_to_target_s"] / best_fo["time_to_target_s"]
    late = [r for r in rows if r["late_mean_metric"] is not None]
    best_late = None
    fo_late = [r for r in late if r["kind"] in FIRST_ORDER]
    if fo_late:
        best_late = (max if higher else min)(fo_late, key=lambda r: r["late_mean_metric"])
    sn_late = [r for r in late if r["kind"] == "snopt"]
    sn_late = (max if higher else min)(sn_late, key=lambda r: r["late_mean_metric"]) if sn_late else None
    return dict(target=target, target_source=target_source, metric=result.task.metric,
                snopt_late_mean=sn_late["late_mean_metric"] if sn_late else None,
                best_first_order_late_mean=best_late["late_mean_metric"] if best_late else None,
                best_first_order_late=best_late["optimizer"] if best_late else None,
                higher_is_better=higher, optimizers=rows,
                snopt_time_ratio=ratio, snopt_run=snopt["optimizer"] if snopt else None,
                best_first_order=best_fo["optimizer"] if best_fo else None,
                interrupted=result.interrupted)


def machine_info(device: torch.device) -> dict:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count()
    info = dict(cores=nproc, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                processor=platform.processor() or platform.machine(), snopt_dyn=snopt_dyn.__version__,
                device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(result: CompareResult, summary: dict) -> str:
    """The human-readable result: one row per optimizer, then the SNOpt verdict."""
    task = result.task
    metric = "acc" if task.metric == "accuracy" else task.metric
    target = summary["target"]
    header = ["optimizer", "lr", "iters", "train s", "it/s", f"final {metric}", f"best {metric}", "last 1/3 mean",
              f"time to {fmt_metric(target, task) if target is not None else 'target'}",
              "NFE/it", "fwd/bwd", "sampling NFE/it"]
    lines = []
    for r in summary["optimizers"]:
        ttt = "-" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s"
        if r["time_to_target_s"] is None and target is not None:
            ttt = "not reached"
        lines.append([r["optimizer"], f"{r['lr']:g}", str(r["iterations"]), f"{r['train_clock_s']:.1f}",
                      f"{r['iters_per_s']:.2f}" if r["iters_per_s"] else "-",
                      fmt_metric(r["final_metric"], task), fmt_metric(r["best_metric"], task),
                      fmt_metric(r["late_mean_metric"], task), ttt,
                      f"{r['nfe_per_iter']:.1f}",
                      f"{r['nfe_forward_per_iter']:.1f}/{r['nfe_backward_per_iter']:.1f}",
                      "-" if r["sampling_nfe_per_iter"] is None else f"{r['sampling_nfe_per_iter']:.2f}"])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    out = io.StringIO()
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out.write(fmt(header) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in lines:
        out.write(fmt(row) + "\n")
    if target is not None:
        out.write(f"target {fmt_metric(target, task)}: {summary['target_source']}\n")
    ratio = summary["snopt_time_ratio"]
    snopt = next((r for r in summary["optimizers"] if r["optimizer"] == summary["snopt_run"]), None)
    if ratio is not None:
        verdict = "faster" if ratio < 1 else "slower"
        out.write(f"SNOpt time-to-target / best first-order ({summary['best_first_order']}): "
                  f"{ratio:.2f}x ({verdict})\n")
    elif snopt is not None and target is not None:
        if snopt["time_to_target_s"] is None:
            out.write("SNOpt time-to-target / best first-order: n/a (SNOpt did not reach the target)\n")
        else:
            out.write("SNOpt time-to-target / best first-order: n/a (no first-order method reached the target)\n")
    if summary["snopt_late_mean"] is not None and summary["best_first_order_late_mean"] is not None:
        out.write(f"at equal time (mean test {metric} over the last third of each run): SNOpt "
                  f"{fmt_metric(summary['snopt_late_mean'], task)} vs best first-order "
                  f"({summary['best_first_order_late']}) {fmt_metric(summary['best_first_order_late_mean'], task)}\n")
    for r in summary["optimizers"]:
        if r["status"] != "ok":
            out.write(f"note: {r['optimizer']} {r['status']}\n")
    if summary["interrupted"]:
        out.write("note: interrupted (Ctrl-C); the numbers cover the training done so far\n")
    return out.getvalue()
